"""Settings of a phantom, as one frozen dataclass stored beside every phantom it makes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from volref.errors import ConfigError

#: more than this many mitochondria per million voxels cannot be placed apart
MAX_DENSITY = 1000.0
# photons / noise**2 must stay a finite Poisson mean, and the scene's geometry finite numbers
NOISE_RANGE = (0.01, 100.0)
VOXEL_UM_RANGE = (1e-4, 1e4)
MAX_ANISOTROPY = 100.0
MIN_CHUNK_VOXELS = 512  # 1x1x1 chunks wrote 4,096 files per array for a 4x32x32 phantom


@dataclass(frozen=True)
class SynthConfig:
    """Everything that decides the voxels of a phantom.

    The same config gives the same voxels for any chunking (``chunks`` only decides storage).

    Lengths are in x/y pixels unless named otherwise; ``z_anisotropy`` is how many x/y pixels
    one z voxel spans (pan-ExM stacks are 2-3x coarser in z).

    Parameters
    ----------
    shape
        Volume shape ``(z, y, x)`` in voxels.
    seed
        Seed of everything random; one seed, one phantom.
    density
        Mitochondria per million voxels. The default gives about 150 in a 2048x2048x150 stack.
    degraded_fraction
        Fraction of mitochondria given a low-SNR area (at least one if > 0 and any exist).
    degraded_length_px
        Range of an area's length along the skeleton. The area spans the mitochondrion's width
        and fades out over about one radius at each end, so (20, 60) gives local spots of about
        one tile (128 px) like the circle of the paper's Fig. 4, with clear stain around them.
    noise
        Noise level; 1.0 is the default photon budget, 2.0 has a quarter of the photons and
        twice the read noise.
    """

    shape: tuple[int, int, int] = (64, 512, 512)
    seed: int = 0
    chunks: tuple[int, int, int] = (32, 256, 256)
    density: float = 0.24
    degraded_fraction: float = 0.1
    noise: float = 1.0
    voxel_size_um: tuple[float, float, float] = (0.375, 0.15, 0.15)
    # geometry (x/y pixels)
    diameter_px: tuple[float, float] = (40.0, 90.0)
    ims_px: tuple[float, float] = (2.0, 5.0)
    cristae_thickness_px: tuple[float, float] = (2.0, 5.0)
    cristae_spacing_px: tuple[float, float] = (8.0, 15.0)
    length_px: tuple[float, float] = (100.0, 2000.0)
    median_length_px: float = 350.0
    branch_probability: float = 0.25
    min_gap_px: float = 6.0
    # optics and photon statistics
    psf_sigma_px: float = 1.2
    psf_sigma_z_vox: float = 1.0
    photons: float = 60.0
    read_noise: float = 2.0
    offset_adu: float = 100.0
    bleach_floor: float = 0.6
    # degradation (the paper's low-SNR simulation)
    degraded_length_px: tuple[float, float] = (20.0, 60.0)
    degraded_strength: tuple[float, float] = (0.75, 0.95)
    degraded_noise: float = 0.12
    degraded_label_threshold: float = 0.3

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # NaN passes every comparison below: refuse it first
            value = getattr(self, f.name)
            for v in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
        if self.density > MAX_DENSITY:
            raise ConfigError(f"density must be <= {MAX_DENSITY} mitochondria per million "
                              f"voxels (they would overlap), got {self.density}")
        for name in ("shape", "chunks"):
            value = getattr(self, name)
            if len(value) != 3 or any(int(v) < 1 for v in value):
                raise ConfigError(f"{name} must be three positive integers (z, y, x), got {value}")
            object.__setattr__(self, name, tuple(int(v) for v in value))
        stored = math.prod(min(c, s) for c, s in zip(self.chunks, self.shape))
        if stored < min(MIN_CHUNK_VOXELS, math.prod(self.shape)):
            raise ConfigError(f"chunks must hold at least {MIN_CHUNK_VOXELS} voxels (one file per "
                              f"chunk and array), got {self.chunks}")
        object.__setattr__(self, "voxel_size_um", tuple(float(v) for v in self.voxel_size_um))
        lo, hi = (float(v) for v in self.degraded_length_px)
        if not 0.0 <= lo <= hi:
            raise ConfigError(f"degraded length must be a range 0 <= min <= max, got {(lo, hi)}")
        object.__setattr__(self, "degraded_length_px", (lo, hi))
        if self.density < 0:
            raise ConfigError(f"density must be >= 0, got {self.density}")
        if not 0.0 <= self.degraded_fraction <= 1.0:
            raise ConfigError(f"degraded fraction must be in [0, 1], got {self.degraded_fraction}")
        if not NOISE_RANGE[0] <= self.noise <= NOISE_RANGE[1]:
            raise ConfigError(f"noise level must be in [{NOISE_RANGE[0]}, {NOISE_RANGE[1]}] (1 is the "
                              f"default photon budget), got {self.noise}")
        if self.seed < 0 or self.seed >= 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")
        if any(not VOXEL_UM_RANGE[0] <= v <= VOXEL_UM_RANGE[1] for v in self.voxel_size_um):
            raise ConfigError(f"voxel sizes must be in [{VOXEL_UM_RANGE[0]}, {VOXEL_UM_RANGE[1]}] "
                              f"µm, got {self.voxel_size_um}")
        if not 1 / MAX_ANISOTROPY <= self.z_anisotropy <= MAX_ANISOTROPY:
            raise ConfigError(f"the z voxel size must be within {MAX_ANISOTROPY:g}x of the x voxel "
                              f"size, got {self.voxel_size_um}")

    @property
    def z_anisotropy(self) -> float:
        """x/y pixels per z voxel."""
        return self.voxel_size_um[0] / self.voxel_size_um[2]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SynthConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown phantom settings: {', '.join(unknown)}")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
