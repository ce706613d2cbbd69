"""Container images: pins per service kind, SIF files in cache_dir and home_dir, overrides and lookup errors."""
from __future__ import annotations

import pytest

from portal.catalog import images
from portal.errors import ValidationError


@pytest.fixture
def folders(tmp_path):
    cache, home = tmp_path / "cache", tmp_path / "home"
    (cache / "images").mkdir(parents=True)
    (home / "images").mkdir(parents=True)
    return cache, home


def stage(folder, name, size=10):
    path = folder / "images" / name
    path.write_bytes(b"\0" * size)
    return path


@pytest.mark.parametrize("ref, file", [
    ("vllm/vllm-openai:v0.8.4", "vllm-openai_v0.8.4.sif"),
    ("docker://vllm/vllm-openai:v0.6.3", "vllm-openai_v0.6.3.sif"),
    ("ghcr.io/princeton-ddss/speech-recognition-inference:0.1.2", "speech-recognition-inference_0.1.2.sif"),
    ("localhost:5000/lab/whisper", "whisper_latest.sif"),
    ("ubuntu", "ubuntu_latest.sif"),
    ("my-own_build.sif", "my-own_build.sif"),
])
def test_sif_names_follow_apptainer_pull(ref, file):
    assert images.sif_name(ref) == file


@pytest.mark.parametrize("ref", ["../x.sif", "a/b.sif", "Vllm/Upper:1", "x@sha256:abc", "x:bad tag", "", None])
def test_bad_references(ref):
    with pytest.raises(ValidationError, match=r"^image: expected "):
        images.sif_name(ref)


def test_pins_default_and_site(folders):
    assert images.pinned_images() == {"text-generation": "vllm/vllm-openai:v0.8.4",
                                      "speech-recognition": "ghcr.io/princeton-ddss/speech-recognition-inference:0.1.2"}
    pinned = images.pinned_images({"text-generation": "vllm/vllm-openai:v0.6.6"})
    assert pinned["text-generation"] == "vllm/vllm-openai:v0.6.6"
    with pytest.raises(ValidationError) as info:
        images.pinned_images({"image-generation": "x:1"})
    assert str(info.value) == ("kind: unknown service kind or engine 'image-generation' in the image pins (known: "
                               "text-generation, text-embedding, speech-recognition, vllm, llama-cpp, whisper)")
    assert images.pinned_images({"llama-cpp": "ghcr.io/abetlen/llama-cpp-python:v0.3.5"})["llama-cpp"].endswith("v0.3.5")


def test_pins_from_the_site_runtimes_section():
    runtimes = {"text-generation": {"runtime": "apptainer", "image": "vllm/vllm-openai:v0.6.6"},
                "speech-recognition": {"runtime": "native", "command": "whisper-server"}}
    assert images.pins_from_runtimes(runtimes) == {"text-generation": "vllm/vllm-openai:v0.6.6"}
    assert images.pinned_images(images.pins_from_runtimes(runtimes))["speech-recognition"] == \
        images.DEFAULT_PINS["speech-recognition"]
    assert images.pins_from_runtimes(None) == {}


def test_lookup_cache_first_then_home(folders):
    cache, home = folders
    pins = {"text-generation": "vllm/vllm-openai:v0.6.6"}
    in_home = stage(home, "vllm-openai_v0.6.6.sif", 7)
    found = images.find_image("text-generation", cache_dir=cache, home_dir=home, pins=pins)
    assert (found.file, found.location, found.path, found.size_bytes) == ("vllm-openai_v0.6.6.sif", "home", in_home, 7)
    in_cache = stage(cache, "vllm-openai_v0.6.6.sif", 9)
    found = images.find_image("text-generation", cache_dir=cache, home_dir=home, pins=pins)
    assert (found.location, found.path) == ("cache", in_cache)


def test_per_launch_override_by_file_tag_or_reference(folders):
    cache, home = folders
    pins = {"text-generation": "vllm/vllm-openai:v0.6.6"}
    stage(cache, "vllm-openai_v0.6.6.sif")
    newer = stage(home, "vllm-openai_v0.7.0.sif")
    for override in ("vllm-openai_v0.7.0.sif", "v0.7.0", "vllm/vllm-openai:v0.7.0", "docker://vllm/vllm-openai:v0.7.0"):
        assert images.find_image("text-generation", cache_dir=cache, home_dir=home, pins=pins, image=override).path == newer
    assert images.wanted_file("text-generation", "v0.7.0", pins) == ("vllm-openai_v0.7.0.sif", "vllm/vllm-openai:v0.7.0")


def test_missing_image_says_what_is_there_and_how_to_get_it(folders):
    cache, home = folders
    stage(cache, "vllm-openai_v0.6.6.sif")
    stage(home, "vllm-openai_v0.7.0.sif")
    stage(home, "other_v1.sif")
    with pytest.raises(ValidationError) as info:
        images.find_image("text-generation", cache_dir=cache, home_dir=home)
    assert str(info.value) == (
        f"image: vllm-openai_v0.8.4.sif for text-generation is not in {cache}/images or {home}/images; available: "
        "vllm-openai_v0.6.6.sif (cache), vllm-openai_v0.7.0.sif (home); get it with: apptainer pull "
        "docker://vllm/vllm-openai:v0.8.4")
    assert info.value.extra["field"] == "image"
    with pytest.raises(ValidationError) as info:
        images.find_image("speech-recognition", cache_dir=cache, home_dir=home, image="mine.sif")
    assert str(info.value) == (f"image: mine.sif for speech-recognition is not in {cache}/images or {home}/images; "
                               "available: none")
    with pytest.raises(ValidationError, match=r"^image: no image is pinned for llama-cpp: set runtimes.llama-cpp.image"):
        images.find_image("llama-cpp", cache_dir=cache, home_dir=home)
    with pytest.raises(ValidationError, match=r"^image: expected a .sif file name, a tag or an image reference"):
        images.find_image("text-generation", cache_dir=cache, home_dir=home, image="v1 beta")


def test_listing_per_kind(folders):
    cache, home = folders
    pins = {"text-generation": "vllm/vllm-openai:v0.6.6"}
    stage(cache, "vllm-openai_v0.6.6.sif", 5)
    stage(home, "vllm-openai_v0.6.6.sif", 6)  # the same version again in home: not "another version"
    stage(home, "vllm-openai_v0.7.0.sif", 8)
    stage(home, "speech-recognition-inference_0.1.1.sif", 3)
    (home / "images" / "vllm-openai_v9.sif").mkdir()  # not a file: ignored
    listing = images.list_images(cache_dir=cache, home_dir=home, pins=pins)
    assert listing == [
        {"kind": "text-generation", "image": "vllm/vllm-openai:v0.6.6", "file": "vllm-openai_v0.6.6.sif",
         "available": True, "location": "cache", "path": str(cache / "images" / "vllm-openai_v0.6.6.sif"),
         "size_bytes": 5, "other_versions": [{"file": "vllm-openai_v0.7.0.sif", "location": "home",
                                              "path": str(home / "images" / "vllm-openai_v0.7.0.sif"), "size_bytes": 8}]},
        {"kind": "speech-recognition", "image": "ghcr.io/princeton-ddss/speech-recognition-inference:0.1.2",
         "file": "speech-recognition-inference_0.1.2.sif", "available": False, "location": None, "path": None,
         "size_bytes": None, "other_versions": [
             {"file": "speech-recognition-inference_0.1.1.sif", "location": "home",
              "path": str(home / "images" / "speech-recognition-inference_0.1.1.sif"), "size_bytes": 3}]},
    ]


def test_site_pin_to_a_local_sif_file(folders):
    cache, home = folders
    built = stage(cache, "whisper-server_2024.sif")
    pins = {"speech-recognition": "whisper-server_2024.sif"}
    assert images.find_image("speech-recognition", cache_dir=cache, home_dir=home, pins=pins).path == built
    stage(home, "whisper-server_2025.sif")
    assert images.find_image("speech-recognition", cache_dir=cache, home_dir=home, pins=pins, image="2025").file == \
        "whisper-server_2025.sif"


def test_no_folders(tmp_path):
    assert images.list_images(cache_dir=None, home_dir=None)[0]["available"] is False
    with pytest.raises(ValidationError, match=r"is not in no image folder; available: none"):
        images.find_image("text-generation", cache_dir=None, home_dir=None)
