"""Samplers: stateless loops over a denoiser, one per method (`sigma_samplers`, `timestep_samplers`,
`kdiffusion_samplers`), the table that names them (`registry`), the grids they walk (`schedules`,
`schedule_types`), their noise (`noise`, `philox`) and the functions that run any of them (`run.sample`,
diffusers-equal; `run.sample_a1111`, A1111-equal)."""

from .noise import RNG_SOURCES, A1111Noise, GeneratorNoise, NoiseSource, create_generator, rng_source
from .registry import (
    A1111_AUTOMATIC_SCHEDULE,
    ALL_SAMPLERS,
    ALL_SCHEDULE_TYPES,
    COMPAT_MODES,
    SAMPLERS,
    SCHEDULE_TYPES,
    SamplerEntry,
    a1111_name,
    a1111_sampler,
    resolve_schedule,
    sampler_entry,
)
from .run import StepCallback, StepEvent, a1111_options, sample, sample_a1111

__all__ = [
    "A1111_AUTOMATIC_SCHEDULE", "ALL_SAMPLERS", "ALL_SCHEDULE_TYPES", "COMPAT_MODES", "RNG_SOURCES", "SAMPLERS",
    "SCHEDULE_TYPES", "A1111Noise", "GeneratorNoise", "NoiseSource", "SamplerEntry", "StepCallback", "StepEvent",
    "a1111_name", "a1111_options", "a1111_sampler", "create_generator", "resolve_schedule", "rng_source", "sample",
    "sample_a1111", "sampler_entry",
]
