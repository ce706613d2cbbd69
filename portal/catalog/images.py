"""Container images: the pinned image of each service kind, its SIF file in cache_dir or home_dir, and overrides."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

from ..errors import ValidationError
from .kinds import ENGINES, KINDS

# The images Pilotfish is tested against, per kind; a site changes them with `pins` (see pinned_images).
DEFAULT_PINS: Dict[str, str] = {
    "text-generation": "vllm/vllm-openai:v0.8.4",
    "speech-recognition": "ghcr.io/princeton-ddss/speech-recognition-inference:0.1.2",
}
SIF_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]{0,200}\.sif$")
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
IMAGE_REF = re.compile(r"^(docker://)?[a-z0-9][a-z0-9._\-/]*(:[0-9]+)?[a-z0-9._\-/]*(:[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127})?$")


@dataclass
class ImageFile:
    """A SIF file found on disk."""
    file: str
    location: str  # "cache" or "home"
    path: Path
    size_bytes: int

    def to_dict(self) -> dict:
        """Plain data for the API."""
        return {"file": self.file, "location": self.location, "path": str(self.path), "size_bytes": self.size_bytes}


def parse_image_ref(ref: str) -> Tuple[str, str]:
    """(name, tag) of an image reference as `apptainer pull` names its file: ghcr.io/org/name:1.2 -> (name, 1.2)."""
    if not isinstance(ref, str) or not IMAGE_REF.fullmatch(ref) or "@" in ref:
        raise ValidationError("image", f"expected an image such as vllm/vllm-openai:v0.8.4, got {ref!r}")
    path = ref[len("docker://"):] if ref.startswith("docker://") else ref
    last = path.rsplit("/", 1)[-1]
    name, _, tag = last.partition(":")
    return name, tag or "latest"


def sif_name(ref: str) -> str:
    """The file `apptainer pull docker://<ref>` writes: vllm/vllm-openai:v0.8.4 -> vllm-openai_v0.8.4.sif.

    A ref that already is a .sif file name is returned unchanged.
    """
    if isinstance(ref, str) and ref.endswith(".sif"):
        if not SIF_FILE.fullmatch(ref):
            raise ValidationError("image", f"expected a .sif file name without a folder, got {ref!r}")
        return ref
    name, tag = parse_image_ref(ref)
    return f"{name}_{tag}.sif"


def pinned_images(pins: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """kind (or engine) -> image reference: the defaults, replaced by the site's `pins` (an image ref or a .sif name)."""
    merged = dict(DEFAULT_PINS)
    for kind, ref in (pins or {}).items():
        if kind not in KINDS and kind not in ENGINES:
            raise ValidationError("kind", f"unknown service kind or engine {kind!r} in the image pins "
                                          f"(known: {', '.join([*KINDS, *ENGINES])})")
        sif_name(ref)  # checks it
        merged[kind] = ref
    return merged


def pins_from_runtimes(runtimes: Optional[Mapping]) -> Dict[str, str]:
    """The pins set in the site config's `runtimes` section: {kind: runtimes[kind]["image"]} where there is one."""
    return {kind: spec["image"] for kind, spec in (runtimes or {}).items()
            if isinstance(spec, Mapping) and isinstance(spec.get("image"), str) and spec["image"]}


def image_dirs(cache_dir: Optional[Path], home_dir: Optional[Path]) -> List[Tuple[str, Path]]:
    """The image folders in lookup order: ("cache", cache_dir/images) then ("home", home_dir/images)."""
    return [(name, Path(base) / "images") for name, base in (("cache", cache_dir), ("home", home_dir)) if base]


def _stem(ref: str) -> str:
    """The part of a SIF name before the tag: vllm-openai for vllm/vllm-openai:v1 and for vllm-openai_v1.sif."""
    if ref.endswith(".sif"):
        return ref[:-4].rpartition("_")[0] or ref[:-4]
    return parse_image_ref(ref)[0]


def staged_versions(stem: str, cache_dir: Optional[Path], home_dir: Optional[Path]) -> List[ImageFile]:
    """Every `<stem>_<tag>.sif` in the image folders, cache first, newest file name last within a folder."""
    found = []
    for location, folder in image_dirs(cache_dir, home_dir):
        for path in sorted(folder.glob(f"{_glob_escape(stem)}_*.sif")) if folder.is_dir() else []:
            if SIF_FILE.fullmatch(path.name) and path.is_file():
                found.append(ImageFile(path.name, location, path, path.stat().st_size))
    return found


def _glob_escape(text: str) -> str:
    """`text` matched literally by glob."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _locate(file: str, cache_dir: Optional[Path], home_dir: Optional[Path]) -> Optional[ImageFile]:
    for location, folder in image_dirs(cache_dir, home_dir):
        path = folder / file
        if path.is_file():
            return ImageFile(file, location, path, path.stat().st_size)
    return None


def wanted_file(kind: str, image: Optional[str] = None, pins: Optional[Mapping[str, str]] = None) -> Tuple[str, str]:
    """(SIF file name, reference) a launch of `kind` asks for: the pin, or the `image` override.

    `image` may be a file name (vllm-openai_v0.7.0.sif), a tag of the pinned image (v0.7.0) or a full reference
    (vllm/vllm-openai:v0.7.0).
    """
    pinned = pinned_images(pins)
    if kind not in pinned:
        raise ValidationError("image", f"no image is pinned for {kind}: set runtimes.{kind}.image in the site config "
                                       f"(pinned: {', '.join(pinned)})")
    ref = pinned[kind]
    if image is None:
        return sif_name(ref), ref
    if not isinstance(image, str) or not image:
        raise ValidationError("image", f"expected a .sif file name, a tag or an image reference, got {image!r}")
    if image.endswith(".sif"):
        return sif_name(image), image
    if "/" in image or ":" in image:
        return sif_name(image), image
    if not TAG.fullmatch(image):
        raise ValidationError("image", f"expected a .sif file name, a tag or an image reference, got {image!r}")
    if ref.endswith(".sif"):
        return f"{_stem(ref)}_{image}.sif", f"{_stem(ref)}_{image}.sif"
    base = ref.rsplit(":", 1)[0] if ":" in ref.rsplit("/", 1)[-1] else ref
    return sif_name(f"{base}:{image}"), f"{base}:{image}"


def find_image(kind: str, *, cache_dir: Optional[Path], home_dir: Optional[Path], image: Optional[str] = None,
               pins: Optional[Mapping[str, str]] = None) -> ImageFile:
    """The SIF file to run `kind` with (cache_dir first, then home_dir); the one lookup for listing and launch.

    Raises ValidationError("image", ...) naming the folders searched, the versions that are there and how to get
    the missing one.
    """
    file, ref = wanted_file(kind, image, pins)
    found = _locate(file, cache_dir, home_dir)
    if found is not None:
        return found
    others = staged_versions(_stem(file), cache_dir, home_dir)
    where = " or ".join(str(folder) for _, folder in image_dirs(cache_dir, home_dir)) or "no image folder"
    available = ", ".join(f"{item.file} ({item.location})" for item in others) or "none"
    hint = "" if ref.endswith(".sif") else f"; get it with: apptainer pull docker://{ref.removeprefix('docker://')}"
    raise ValidationError("image", f"{file} for {kind} is not in {where}; available: {available}{hint}")


def list_images(*, cache_dir: Optional[Path], home_dir: Optional[Path],
                pins: Optional[Mapping[str, str]] = None) -> List[dict]:
    """Per service kind: its pinned image, the SIF file, whether and where it is staged, and other versions."""
    out = []
    for kind, ref in pinned_images(pins).items():
        file = sif_name(ref)
        found = _locate(file, cache_dir, home_dir)
        out.append({
            "kind": kind, "image": ref, "file": file, "available": found is not None,
            "location": found.location if found else None, "path": str(found.path) if found else None,
            "size_bytes": found.size_bytes if found else None,
            "other_versions": [item.to_dict() for item in staged_versions(_stem(file), cache_dir, home_dir)
                               if item.file != file],
        })
    return out
