"""The Python API: load a model once, generate many images, watch one emerge.

    python examples/api.py MODEL [--size 512] [--steps 20]

MODEL is an SD 1.x checkpoint (.safetensors / .ckpt) or a diffusers folder.
"""

import argparse

from sdtorch.pipeline import Pipeline
from sdtorch.preview import LatentPreview

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--size", type=int, default=None, help="default: the model's own size")
parser.add_argument("--steps", type=int, default=20)
args = parser.parse_args()

pipe = Pipeline.load(args.model)  # device="auto": a GPU in fp16 when there is one, else the CPU in fp32

# Two images in one call; image i uses seed 7 + i, so either can be made again alone.
result = pipe.generate("a lighthouse in a storm", steps=args.steps, seed=7, batch=2, width=args.size, height=args.size)
for image, params in zip(result.images, result.params):
    image.save(f"lighthouse-{params.seed}.png")
    print(f"lighthouse-{params.seed}.png:", params.sampler, params.steps, "steps")

# Watch it emerge: the callback sees every step's latents and predicted clean latents;
# the linear preview turns latents into a picture for almost no cost.
preview = LatentPreview.fit(pipe.model.vae)
frames = []
pipe.generate(
    "a lighthouse in a storm", steps=args.steps, seed=7, width=args.size, height=args.size,
    callback=lambda step, total, sigma, x, predicted: frames.append(preview(predicted)[0]),
)
frames[0].save("emerging.gif", save_all=True, append_images=frames[1:], duration=150, loop=0)
print(f"emerging.gif: {len(frames)} frames")
