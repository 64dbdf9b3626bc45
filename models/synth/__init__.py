"""Procedural synthetic defect images (the seed design used Blender; numpy + OpenCV here)."""

from models.synth.generator import CLASSES, SynthConfig, SynthSample, generate_sample
from models.synth.writer import write_dataset

__all__ = ["CLASSES", "SynthConfig", "SynthSample", "generate_sample", "write_dataset"]
