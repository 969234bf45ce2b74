"""The server in a background thread of this process, on a free loopback port: for notebooks,
scripts and tests.

    with BackgroundServer() as server:          # the embedded model
        requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "a red circle"})
"""

from __future__ import annotations

import socket
import threading
import time

from sdtorch.errors import SdtorchError

from .jobs import JobQueue
from .models import ModelRegistry


class BackgroundServer:
    def __init__(self, *, model=None, models_dir=None, queue_size: int = 16, device: str = "cpu",
                 dtype: str | None = None, host: str = "127.0.0.1", lora_dir=None, embeddings_dir=None,
                 taesd=None, **app_options):
        import uvicorn

        from .app import create_app

        self.jobs = JobQueue(ModelRegistry(model, models_dir), queue_size=queue_size, device=device,
                             dtype=dtype, lora_dir=lora_dir, embeddings_dir=embeddings_dir, taesd=taesd).start()
        self.app = create_app(self.jobs, **app_options)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, 0))
        self.host, self.port = self._socket.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", timeout_keep_alive=30, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="sdtorch-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise SdtorchError("the background server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)
        self.jobs.close()
        self._socket.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
