"""``--previewonly``: write x<suffix>.webp (the latent decoded back by the VAE) beside images, and no sidecars.

Where x<suffix> exists, its stored latent is decoded: the preview shows what training will see. Where
it does not, the image is encoded as the cache would encode it and only the preview is written, as the
original scripts' --previewonly does. Images that already have a preview are passed over unless
``--overwrite``. Each preview is written atomically; an unreadable sidecar or image is reported and
passed over.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..atomic import write_atomically
from ..sidecar import IMAGE_LATENT_KEY, SidecarError, preview_path, read_sidecar, sidecar_path
from .images import ImageRejected, load_image
from .plan import scan_roots


@dataclass
class PreviewSummary:
    from_sidecars: int = 0
    from_images: int = 0
    kept: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    def render(self) -> str:
        lines = [f"previews written {self.from_sidecars + self.from_images} ({self.from_sidecars} from existing "
                 f"latents, {self.from_images} from images without one; no sidecar written), already there "
                 f"{self.kept}, failed {len(self.failed)}"]
        lines += [f"  failed: {path}: {reason}" for path, reason in self.failed[:5]]
        return "\n".join(lines)


def write_previews(builder, roots: list[str], extensions: tuple[str, ...], out_suffix: str,
                   overwrite: bool = False) -> PreviewSummary:
    """Previews for every image under ``roots`` (``builder``: an ImageLatentBuilder, for its VAE and sizes)."""
    summary = PreviewSummary()
    for source in scan_roots(roots, extensions, out_suffix).sources:
        sidecar = sidecar_path(source, out_suffix)
        target = preview_path(sidecar)
        if target.exists() and not overwrite:
            summary.kept += 1
            continue
        try:
            if sidecar.exists():
                latent = read_sidecar(sidecar, IMAGE_LATENT_KEY, ndim=3)
                summary.from_sidecars += 1
            else:
                pixels = load_image(source, builder.sizing, builder.min_size).pixels
                latent = builder.latents_of(pixels[None])[0].to(builder.save_dtype).cpu()
                summary.from_images += 1
            write_atomically(target, builder.preview_of(latent[None])[0])
        except (SidecarError, ImageRejected, OSError, ValueError) as error:
            summary.failed.append((os.fspath(sidecar if sidecar.exists() else source), f"{error}"))
    return summary
