"""Sampling from a GeneratorModule: DDIM + compositional CFG, semantic guidance, DDIM inversion, specs."""
from lightning_synfer.sampling.ddim import DDIMSampler, SamplerSettings, split_prediction
from lightning_synfer.sampling.guidance import SemanticGuidance
from lightning_synfer.sampling.inversion import ddim_invert, inverted_steps
from lightning_synfer.sampling.specs import Spec, build_specs, specs_from_config

__all__ = ["DDIMSampler", "SamplerSettings", "split_prediction", "SemanticGuidance", "ddim_invert",
           "inverted_steps", "Spec", "build_specs", "specs_from_config"]
