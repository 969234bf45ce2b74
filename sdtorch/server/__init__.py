"""`sdtorch serve`: an AUTOMATIC1111-compatible HTTP API and a page that shows the image emerge.

    sdtorch serve                                   # the embedded model on http://127.0.0.1:7860
    sdtorch serve --models ~/models --api-auth me:secret --listen

FastAPI and uvicorn are the `server` extra (`pip install 'sdtorch[server]'`); this module imports
neither, so the rest of sdtorch runs without them. `app` builds the routes, `a1111` maps A1111's
JSON onto `GenerationRequest`, `jobs` runs the generations, `models` lists what may be loaded.
"""

from __future__ import annotations

import argparse

from sdtorch.errors import SdtorchError


def add_serve_parser(commands) -> argparse.ArgumentParser:
    serve = commands.add_parser("serve", help="an AUTOMATIC1111-compatible HTTP API and a web page")
    serve.add_argument("--model", help="checkpoint served first (default: the model embedded in sdtorch)")
    serve.add_argument("--models", metavar="DIR", help="make every checkpoint in DIR selectable "
                       "(.safetensors, .ckpt, diffusers folders; sub-folders too)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 with --listen)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    serve.add_argument("--listen", action="store_true", help="accept connections from other machines (0.0.0.0)")
    serve.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS]", help="HTTP Basic auth on every route")
    serve.add_argument("--cors-allow-origins", metavar="ORIGINS",
                       help="comma-separated origins allowed to call the API from a browser (default: none)")
    serve.add_argument("--queue-size", type=int, default=16,
                       help="jobs that may wait behind the running one; beyond, 503 (default 16)")
    serve.add_argument("--max-body-mb", type=float, default=64, help="largest request body in MiB (default 64)")
    serve.add_argument("--loras", "--lora-dir", dest="lora_dir", metavar="DIR",
                       help="LoRA files that prompts name as <lora:NAME:WEIGHT>")
    serve.add_argument("--embeddings-dir", metavar="DIR", help="textual-inversion embeddings, used by name in prompts")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default auto)")
    serve.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default fp16 on a GPU; on the CPU bf16 "
                       "where it is native (AVX512-BF16, AMX), else fp32")
    serve.add_argument("--taesd", metavar="PATH", help="TAESD weights (a folder with taesd_decoder.safetensors): the "
                       "live preview decodes through it, and requests may ask for a TAESD final decode "
                       "(override_settings.sd_vae_decode_method: TAESD)")
    serve.add_argument("--compat", choices=["diffusers", "a1111"], default="diffusers",
                       help="the sampling path /sdapi/v1 runs: diffusers (default: diffusers' images) or a1111 "
                       "(AUTOMATIC1111's images: its samplers and schedule types, its GPU noise by default, "
                       "subseeds, ENSD); /sdapi/v1/options' sdtorch_compat switches it too")
    return serve


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app, parse_auth
    except ImportError as e:
        raise SdtorchError(f"sdtorch serve needs FastAPI and uvicorn ({e.name} is missing): "
                           "pip install 'sdtorch[server]'") from None
    from .jobs import JobQueue
    from .models import ModelRegistry

    if not 0 <= args.port <= 65535:
        raise SdtorchError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_body_mb <= 0:
        raise SdtorchError(f"--max-body-mb must be above 0, got {args.max_body_mb}")
    auth = parse_auth(args.api_auth)
    origins = [o.strip() for o in (args.cors_allow_origins or "").split(",") if o.strip()]
    host = args.host or ("0.0.0.0" if args.listen else "127.0.0.1")
    registry = ModelRegistry(args.model, args.models)
    jobs = JobQueue(registry, queue_size=args.queue_size, device=args.device, dtype=args.dtype,
                    lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir, taesd=args.taesd)
    print(f"sdtorch: loading {registry.default().title} ...", flush=True)
    jobs.start()
    flags = {"listen": args.listen, "port": args.port, "host": host, "queue_size": args.queue_size,
             "api_auth": "<set>" if auth else None, "cors_allow_origins": args.cors_allow_origins,
             "models": bool(args.models), "device": args.device, "dtype": args.dtype, "compat": args.compat}
    app = create_app(jobs, auth=auth, cors_origins=origins, max_body_bytes=int(args.max_body_mb * 2**20), flags=flags,
                     compat=args.compat)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"sdtorch: serving on http://{shown}:{args.port}/ (A1111 API at /sdapi/v1)", flush=True)
    try:
        uvicorn.run(app, host=host, port=args.port, timeout_keep_alive=30, timeout_graceful_shutdown=10,
                    log_level="warning")
    finally:
        jobs.close()
    return 0


__all__ = ["add_serve_parser", "serve"]
