"""Phantom pan-ExM z-stacks with ground truth, generated lazily chunk by chunk."""

from volref.synth.config import SynthConfig
from volref.synth.phantom import Phantom, make_phantom
from volref.synth.render import render_box
from volref.synth.scene import Scene, build_scene

__all__ = ["Phantom", "Scene", "SynthConfig", "build_scene", "make_phantom",
           "render_box"]
