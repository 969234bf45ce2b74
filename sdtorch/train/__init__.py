"""Training of the embedded shapes model: Stable Diffusion's three stages in small.

1. `clip_stage`: the CLIP text encoder, contrastive against a small image tower (Radford et al. 2021);
2. `vae_stage`: the KL autoencoder and its latent scale factor (Rombach et al. 2022);
3. `unet_stage`: the latent-diffusion UNet, epsilon prediction with caption dropout for
   classifier-free guidance (Ho et al. 2020; Ho & Salimans 2022) and EMA weights.

`recipe` holds the architecture and hyper-parameters; `python -m sdtorch.train --out DIR` runs it all.
"""
