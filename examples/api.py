"""The Python API: load a model once, generate many images, watch one emerge.

    python examples/api.py MODEL [--size 512] [--steps 20]

MODEL is an SD 1.x checkpoint (.safetensors / .ckpt) or a diffusers folder.
"""

import argparse

from sdtorch.pipeline import Pipeline
from sdtorch.preview import LatentPreview
from sdtorch.request import GenerationRequest

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--size", type=int, default=None, help="default: the model's own size")
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()

pipe = Pipeline.load(args.model)  # device="auto": a GPU in fp16 when there is one, else the CPU in fp32

# Two images in one call; image i uses seed 7 + i, so either can be made again alone.
result = pipe.generate("a lighthouse in a storm", steps=args.steps, seed=7, batch=2, width=args.size, height=args.size)
for image, request in zip(result.images, result.per_image()):
    image.save(f"lighthouse-{request.seed}.png")
    print(f"lighthouse-{request.seed}.png:", request.sampler, request.schedule, request.steps, "steps")

# The same as a request, the object every entry point builds (no progress bar: `run` only emits
# events). Watch it emerge: the callback gets a StepEvent(step, total, sigma, x, denoised) per
# step; the linear preview turns latents into a picture for almost no cost.
preview = LatentPreview.fit(pipe.model.vae)
frames = []
request = GenerationRequest(prompt="a lighthouse in a storm", steps=args.steps, seed=7, width=args.size,
                            height=args.size)
pipe.run(request, callback=lambda event: frames.append(preview(event.denoised)[0]))
frames[0].save("emerging.gif", save_all=True, append_images=frames[1:], duration=150, loop=0)
print(f"emerging.gif: {len(frames)} frames")
