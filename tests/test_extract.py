"""excitation extract: sharding, the store, resume after a kill, torchrun with 2 processes, refusals, bad images.

Tiny model (``tests.extract_tiny:tiny``, 16x16 inputs) and 24 generated images (6 chunks of 4).
The time goes to the 4 subprocess jobs (3 ``torchrun`` with 2 ranks, 1 plain process), each
paying ``import torch`` per process, and to inductor in the ``--compile`` test; every test that
needs an uninterrupted one-process store shares the module-scoped ``reference``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

zarr = pytest.importorskip("zarr")

import excitation  # noqa: E402
from excitation.ascent import IMAGENET_NORMALIZE, Normalized  # noqa: E402
from excitation.cli import main  # noqa: E402
from excitation.errors import ExcitationError  # noqa: E402
from excitation.extract import ExtractStoreError, chunk_bounds, chunk_count, extract, load_extract, rank_chunks  # noqa: E402
from excitation.images import list_images, load_image  # noqa: E402
from excitation.models import pixel_transform  # noqa: E402
from excitation.extract.dist import PeerLostError, World  # noqa: E402
from excitation.extract.faults import TEST_DIE_ENV, DieHook  # noqa: E402
from tests.extract_tiny import micro, tiny  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tests.extract_tiny:tiny"
BATCH, SIZE = 4, 16
ARRAYS = ("pullback", "gradient", "logits", "target", "label", "valid")


def _write_images(folder: Path, classes=("cat", "dog"), per_class=12, seed=0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / name / f"{i:02d}.png")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    _write_images(folder)
    return folder


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """A one-process, uninterrupted run (in-process API)."""
    out = tmp_path_factory.mktemp("ref") / "store"
    result = extract(MODEL, images, out, size=SIZE, batch=BATCH, gradient=True, progress=False)
    assert result.chunks_computed == result.chunks_total == 6
    return out


def _cli_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    env.pop(TEST_DIE_ENV, None)
    return env


#: Far above a normal 2-rank run here (~10 s); a rank stuck at a barrier would wait for gloo's 30 minutes.
TORCHRUN_TIMEOUT_S = 180


def _torchrun(images: Path, out: Path, env: dict) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 -m excitation extract ...``.

    Fails the test, naming a hang, if the job is not over in ``TORCHRUN_TIMEOUT_S``; the job
    runs in its own session, so its whole process group (torchrun and both ranks) is killed then.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "excitation", "extract", "--model", MODEL, "--images", str(images), "--out", str(out),
               "--size", str(SIZE), "--batch", str(BATCH), "--gradient", "--no-progress"]
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        stdout, stderr = job.communicate()
        pytest.fail(f"torchrun still running after {TORCHRUN_TIMEOUT_S} s: a rank hangs (at a barrier?)\n"
                    f"{stderr[-2000:]}")
    return subprocess.CompletedProcess(command, job.returncode, stdout, stderr)


def _chunk_files(out: Path) -> dict:
    """``{chunk: {file: mtime_ns}}``: every array's zarr chunk file and the commit marker of each chunk."""
    files: dict = {}
    for path in out.glob("*/c/*"):  # <array>/c/<chunk>[/0/0/0]: the first index is the chunk along the images
        for leaf in ([path] if path.is_file() else [q for q in path.rglob("*") if q.is_file()]):
            files.setdefault(int(path.name), {})[str(leaf.relative_to(out))] = leaf.stat().st_mtime_ns
    for marker in (out / "_commits").glob("*.json"):
        files.setdefault(int(marker.stem), {})[str(marker.relative_to(out))] = marker.stat().st_mtime_ns
    return files


def _assert_same(a: Path, b: Path) -> None:
    x, y = load_extract(a), load_extract(b)
    assert x["path"] == y["path"]
    for name in ARRAYS:
        left, right = x[name][:], y[name][:]
        assert left.dtype == right.dtype and left.shape == right.shape, name
        assert left.tobytes() == right.tobytes(), f"{name} differs"


# ---------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("n,batch,world", [(24, 4, 2), (23, 4, 3), (5, 8, 4), (1, 1, 1), (17, 3, 5)])
def test_shards_are_disjoint_and_cover_every_image_once(n, batch, world):
    seen = []
    for rank in range(world):
        for chunk in rank_chunks(chunk_count(n, batch), rank, world):
            seen += list(range(*chunk_bounds(chunk, n, batch)))
    assert sorted(seen) == list(range(n))  # nothing dropped, nothing twice (no DistributedSampler padding)


# ------------------------------------------------------------------- one process, reader
def test_store_equals_a_plain_loop_over_pullback_and_reads_lazily(images, reference):
    data = load_extract(reference)
    listed = list_images(images)
    assert data["path"] == listed.paths  # the sorted ImageFolder order
    for name in ("pullback", "logits", "target"):
        assert isinstance(data[name], zarr.Array)  # lazy: nothing read yet
    assert data["pullback"].shape == (24, 3, SIZE, SIZE) and data["pullback"].dtype == np.float16
    assert data["pullback"].chunks[0] == BATCH
    model = Normalized(tiny(), *IMAGENET_NORMALIZE).eval()
    transform = pixel_transform(int(round(SIZE * 256 / 224)), SIZE)
    for start in range(0, 24, BATCH):
        x = torch.stack([load_image(p, transform) for p in listed.paths[start:start + BATCH]])
        with torch.no_grad():
            logits = model(x)
        target = logits.argmax(1)
        expected = excitation.pullback(model, x, target).numpy().astype(np.float16)
        assert np.array_equal(data["logits"][start:start + BATCH], logits.numpy())
        assert np.array_equal(data["target"][start:start + BATCH], target.numpy())
        assert np.array_equal(data["pullback"][start:start + BATCH], expected)
        grad = excitation.gradient(model, x, target).numpy().astype(np.float16)
        assert np.array_equal(data["gradient"][start:start + BATCH], grad)
    assert data["label"][:].tolist() == listed.labels and data["valid"][:].all()
    meta = data.metadata
    assert meta["complete"] and meta["errors"] == [] and meta["throughput_images_per_s"] > 0
    assert meta["versions"]["torch"] == torch.__version__ and "cpu_count" in meta["machine"]
    assert meta["options"]["batch"] == BATCH and meta["runs"][-1]["world_size"] == 1


def test_several_targets_per_image_match_pullback_per_class(images, tmp_path):
    out = tmp_path / "multi"
    extract(MODEL, images, out, size=SIZE, batch=8, targets="1,3", progress=False)
    data = load_extract(out)
    assert data["pullback"].shape == (24, 2, 3, SIZE, SIZE) and data["target"][:].tolist() == [[1, 3]] * 24
    model = Normalized(tiny(), *IMAGENET_NORMALIZE).eval()
    transform = pixel_transform(int(round(SIZE * 256 / 224)), SIZE)
    x = torch.stack([load_image(p, transform) for p in data["path"][:8]])
    for column, cls in enumerate((1, 3)):
        expected = excitation.pullback(model, x, cls).numpy()
        np.testing.assert_allclose(data["pullback"][:8, column].astype(np.float32), expected, rtol=2e-3, atol=1e-5)


# ------------------------------------------------------------------------- torchrun
def test_two_torchrun_processes_equal_one_process_exactly(images, reference, tmp_path):
    out = tmp_path / "two"
    done = _torchrun(images, out, _cli_env())
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same(out, reference)
    commits = [json.loads(p.read_text()) for p in sorted((out / "_commits").glob("*.json"))]
    assert [c["chunk"] for c in commits] == list(range(6))  # every chunk, hence every image, once
    assert {c["chunk"]: c["rank"] for c in commits} == {c: c % 2 for c in range(6)}
    assert load_extract(out).metadata["runs"][-1]["world_size"] == 2


def test_a_killed_run_resumes_to_a_bit_identical_store(images, reference, tmp_path):
    """``kill -9`` after chunk 1's commit and chunk 2's array writes; resume with another world size."""
    out = tmp_path / "killed"
    env = _cli_env()
    env[TEST_DIE_ENV] = "0:2"  # the (only) rank commits chunks 0 and 1, writes chunk 2's arrays, then os._exit(9)
    command = [sys.executable, "-m", "excitation", "extract", "--model", MODEL, "--images", str(images), "--out",
               str(out), "--size", str(SIZE), "--batch", str(BATCH), "--gradient", "--no-progress"]
    killed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert killed.returncode == 9, killed.stderr[-2000:]
    with pytest.raises(ExtractStoreError, match="incomplete"):
        load_extract(out)
    assert sorted(int(p.stem) for p in (out / "_commits").glob("*.json")) == [0, 1]
    group = zarr.open_group(str(out), mode="r+")
    assert group["pullback"][8:12].any()  # chunk 2 was written but not committed
    group["pullback"][8:12] = np.float16(7.0)  # what a torn write could leave: garbage, uncommitted
    result = extract(MODEL, images, out, size=SIZE, batch=BATCH, gradient=True, progress=False)
    assert result.chunks_computed == 4  # only what was missing: chunks 2..5
    _assert_same(out, reference)
    runs = load_extract(out).metadata["runs"]
    assert len(runs) == 1 and runs[0]["chunks_computed"] == 4  # the killed run never wrote metadata


def test_a_rank_killed_under_torchrun_resumes_to_a_bit_identical_store(images, reference, tmp_path):
    """Rank 1 of 2 dies like ``kill -9`` while rank 0 waits at the final barrier; the same command resumes.

    Rank 0 owns chunks 0, 2, 4 and rank 1 owns 1, 3, 5.  Rank 1 commits chunk 1, writes chunk 3's
    arrays, waits until rank 0 has committed all its chunks (rank 0 is then at, or entering, the
    barrier where it could hang), and dies before committing chunk 3; chunk 5 is never started.
    """
    out = tmp_path / "killed2"
    env = _cli_env()
    env[TEST_DIE_ENV] = "1:1:after-others"
    killed = _torchrun(images, out, env)  # fails the test if the survivor hangs
    assert killed.returncode != 0, killed.stderr[-2000:]
    with pytest.raises(ExtractStoreError, match="incomplete .* rerun the same excitation extract command"):
        load_extract(out)
    assert sorted(int(p.stem) for p in (out / "_commits").glob("*.json")) == [0, 1, 2, 4]
    group = zarr.open_group(str(out), mode="r+")
    assert group["pullback"][12:16].any() and not group["pullback"][20:24].any()  # 3 written, 5 never started
    group["pullback"][12:16] = np.float16(7.0)  # what a torn write could leave: garbage, uncommitted
    before = _chunk_files(out)

    resumed = _torchrun(images, out, _cli_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same(out, reference)  # byte for byte, every array (the garbage in chunk 3 is gone)
    after = _chunk_files(out)
    recomputed = sorted(c for c in after if after[c] != before.get(c))
    assert recomputed == [3, 5]  # only the missing chunks; chunks 0, 1, 2, 4 were not touched
    commits = {c: json.loads((out / "_commits" / f"{c:08d}.json").read_text())["rank"] for c in range(6)}
    assert commits == {c: c % 2 for c in range(6)}  # every chunk, hence every image, committed once, by its owner
    runs = load_extract(out).metadata["runs"]
    assert len(runs) == 1 and runs[0]["world_size"] == 2  # the killed run never wrote metadata
    assert [r["chunks"] for r in runs[0]["ranks"]] == [0, 2] and runs[0]["images_computed"] == 8


def test_a_lost_peer_at_a_collective_is_a_clear_error(monkeypatch):
    """What the survivor says when gloo finds the other rank gone (gloo raises a bare RuntimeError)."""
    import torch.distributed as torch_dist

    def closed(*args, **kwargs):
        raise RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:4242")

    monkeypatch.setattr(torch_dist, "all_gather_object", closed)
    monkeypatch.setattr(torch_dist, "barrier", closed)
    world = World(rank=0, world=2)
    for collective in (lambda: world.gather({"chunks": 3}), world.barrier):
        with pytest.raises(PeerLostError, match=r"rank 0/2: .*another process of the job stopped \(.*Connection "
                                                r"closed by peer.*\)\. The committed chunks are kept: rerun the same"):
            collective()


@pytest.mark.parametrize("value", ["1", "a:2", "1:2:later", "1:2:after-others:x"])
def test_a_malformed_die_hook_is_refused(monkeypatch, value):
    monkeypatch.setenv(TEST_DIE_ENV, value)
    with pytest.raises(ValueError, match=f"{TEST_DIE_ENV}=.*RANK:K or RANK:K:after-others"):
        DieHook.from_env()
    monkeypatch.setenv(TEST_DIE_ENV, "1:2:after-others")
    assert DieHook.from_env() == DieHook(1, 2, True)


# ------------------------------------------------------------------------- --compile
def test_compile_gives_the_eager_store_within_float16_rounding(images, tmp_path):
    """``--compile`` (torch.compile, excitation backend, inductor) against the eager path, on ``micro``.

    ``micro`` is the smallest model that still has a ReLU site, so inductor builds few kernels; one
    compile thread, because on two cores a pool of compile workers costs more than it saves.
    """
    import torch._inductor.config as inductor_config

    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    extract("tests.extract_tiny:micro", images, eager, size=SIZE, batch=8, progress=False)
    # torch's own patch: pytest's monkeypatch would delete the config entry on undo (a config module
    # keeps its values outside __dict__), breaking every later compile in the process.
    with inductor_config.patch(compile_threads=1):
        code = main(["extract", "--model", "tests.extract_tiny:micro", "--images", str(images), "--out",
                     str(compiled), "--size", str(SIZE), "--batch", "8", "--compile", "--no-progress"])  # 3 chunks
    assert code == 0
    e, c = load_extract(eager), load_extract(compiled)
    assert c.metadata["options"]["compile"] is True and e.metadata["options"]["compile"] is False
    assert c["path"] == e["path"] and np.array_equal(c["target"][:], e["target"][:])
    assert c["valid"][:].all() and np.array_equal(c["label"][:], e["label"][:])
    # Inductor fuses and reorders the float32 arithmetic; the stored float16 may then round the other way.
    pb_e, pb_c = e["pullback"][:].astype(np.float32), c["pullback"][:].astype(np.float32)
    scale = float(np.abs(pb_e).max())
    np.testing.assert_allclose(pb_c, pb_e, rtol=0, atol=1e-3 * scale)
    np.testing.assert_allclose(c["logits"][:], e["logits"][:], rtol=1e-5, atol=1e-5)
    # The tolerance is far below what a vanilla gradient (a compile that lost the rewrite) would differ by.
    model = Normalized(micro(), *IMAGENET_NORMALIZE).eval()
    x = torch.stack([load_image(p, pixel_transform(int(round(SIZE * 256 / 224)), SIZE)) for p in e["path"][:8]])
    vanilla = excitation.gradient(model, x, torch.from_numpy(e["target"][:8])).numpy()
    assert np.abs(vanilla - pb_e[:8]).max() > 20 * 1e-3 * scale
    with pytest.raises(ExtractStoreError, match=r"compile: True -> False"):
        extract("tests.extract_tiny:micro", images, compiled, size=SIZE, batch=8, progress=False)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compile"])
def test_a_model_fx_cannot_trace_takes_the_dynamo_path(images, tmp_path, compile):
    """timm's ConViT fails ``symbolic_trace``; extract excites it through dynamo, as ``pullback`` does."""
    import torch._inductor.config as inductor_config

    from tests.extract_tiny import convit

    model = convit()
    with pytest.raises(excitation.ExcitationTraceError):
        excitation.excite(model)
    out = tmp_path / "convit"
    with inductor_config.patch(compile_threads=1):
        code = main(["extract", "--model", "tests.extract_tiny:convit", "--images", str(images), "--out", str(out),
                     "--size", "32", "--batch", "8", "--dtype", "float32", "--no-progress"]
                    + (["--compile"] if compile else []))
    assert code == 0
    data = load_extract(out)
    assert data["valid"][:].all()
    pixel_model = Normalized(model, *IMAGENET_NORMALIZE).eval()
    x = torch.stack([load_image(p, pixel_transform(int(round(32 * 256 / 224)), 32)) for p in data["path"][:8]])
    target = torch.from_numpy(data["target"][:8])
    expected = excitation.pullback(pixel_model, x, target)
    got = torch.from_numpy(data["pullback"][:8])
    assert rel_err(got, expected) < (1e-4 if compile else 1e-6)
    assert rel_err(got, excitation.gradient(pixel_model, x, target)) > 1e-3


# ------------------------------------------------------------------------ refusals
def test_other_options_into_the_same_store_are_refused(images, reference):
    before = (reference / "zarr.json").read_bytes()
    with pytest.raises(ExtractStoreError, match=r"other options \(.*temp: 0\.3 -> 0\.5.*new --out"):
        extract(MODEL, images, reference, size=SIZE, batch=BATCH, gradient=True, temp=0.5, progress=False)
    assert (reference / "zarr.json").read_bytes() == before


def test_the_options_object_and_its_keywords_name_the_same_store(images, reference):
    # The store records the resolved options: Options.build() is what no keyword means.
    again = extract(MODEL, images, reference, size=SIZE, batch=BATCH, gradient=True, options=excitation.Options.build(),
                    progress=False)
    assert again.chunks_computed == 0 and again.chunks_total == 6
    with pytest.raises(ExtractStoreError, match=r"gate: 'sigmoid' -> 'normal_cdf'"):
        extract(MODEL, images, reference, size=SIZE, batch=BATCH, gradient=True,
                options=excitation.Options.build(gate="normal_cdf"), progress=False)


def test_a_corrupt_image_is_an_error_naming_it_or_a_recorded_skip(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    from PIL import Image

    rng = np.random.default_rng(1)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    bad = folder / "2.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ExcitationError, match=r"cannot read image .*2\.png.*--on-error skip"):
        extract(MODEL, folder, tmp_path / "raise", size=SIZE, batch=2, progress=False)
    extract(MODEL, folder, tmp_path / "skip", size=SIZE, batch=2, on_error="skip", progress=False)
    data = load_extract(tmp_path / "skip")
    assert [e["path"] for e in data.metadata["errors"]] == [str(bad)] and data.metadata["errors"][0]["index"] == 2
    assert data["valid"][:].tolist() == [True, True, False, True, True]
    assert not data["pullback"][2].any() and data["target"][2] == -1
    assert np.abs(data["pullback"][3].astype(np.float32)).sum() > 0


# ------------------------------------------------------------------------ CLI errors
@pytest.mark.parametrize("extra,message", [
    (["--batch", "0"], "--batch must be a positive integer"),
    (["--targets", "best"], "--targets 'best'"),
    (["--targets", "label"], "needs labelled images"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, extra, message):
    flat = tmp_path / "flat"
    flat.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(flat / "a.png")
    code = main(["extract", "--model", MODEL, "--images", str(flat), "--out", str(tmp_path / "s"), "--size", "16",
                 "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("excitation: error: ") and message in err


def test_missing_required_argument_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["extract", "--model", MODEL])
    assert exc.value.code == 2 and "--images" in capsys.readouterr().err


def test_accentuations_and_gradients_match_ascend_and_gradient(images, tmp_path):
    out = tmp_path / "acc"
    extract(MODEL, images, out, size=SIZE, batch=8, targets="2", gradient=True, ascend_steps=2, step_size=1.0,
            radius=2.0, preset="semantic", progress=False)
    data = load_extract(out)
    model = Normalized(tiny(), *IMAGENET_NORMALIZE).eval()
    transform = pixel_transform(int(round(SIZE * 256 / 224)), SIZE)
    x = torch.stack([load_image(p, transform) for p in data["path"][8:16]])
    expected = excitation.ascend(model, x, 2, steps=2, step_size=1.0, radius=2.0, preset="semantic", progress=False)
    np.testing.assert_allclose(data["accentuation"][8:16].astype(np.float32), expected.numpy(), atol=1e-3)
    pb = excitation.pullback(model, x, 2, preset="semantic").numpy().astype(np.float16)
    assert np.array_equal(data["pullback"][8:16], pb)
    grad = excitation.gradient(model, x, 2).numpy().astype(np.float16)
    assert np.array_equal(data["gradient"][8:16], grad)
    assert data.metadata["options"]["preset"] == "semantic" and data["target"][:].tolist() == [2] * 24


def test_webdataset_shards_give_the_rows_of_the_same_images_in_a_folder(tmp_path):
    import io
    import tarfile

    from PIL import Image

    flat, shards = tmp_path / "flat", tmp_path / "shards"
    flat.mkdir()
    shards.mkdir()
    rng = np.random.default_rng(3)
    for s in range(2):
        with tarfile.open(shards / f"train-{s:04d}.tar", "w") as tar:
            for i in range(3):
                key = f"s{s}_{i}"
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)).save(buffer, format="PNG")
                (flat / f"{key}.png").write_bytes(buffer.getvalue())
                for name, data in ((f"{key}.png", buffer.getvalue()), (f"{key}.cls", str(i + s).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    extract(MODEL, shards, tmp_path / "from_tar", size=SIZE, batch=4, targets="label", workers=1, progress=False)
    extract(MODEL, flat, tmp_path / "from_dir", size=SIZE, batch=4, targets="2", progress=False)
    tar_data, dir_data = load_extract(tmp_path / "from_tar"), load_extract(tmp_path / "from_dir")
    assert [p.rsplit("#", 1)[1] for p in tar_data["path"]] == [Path(p).name for p in dir_data["path"]]
    assert tar_data["path"][0] == f"{shards / 'train-0000.tar'}#s0_0.png"
    assert tar_data["label"][:].tolist() == [0, 1, 2, 1, 2, 3] == tar_data["target"][:].tolist()
    assert np.array_equal(tar_data["logits"][:], dir_data["logits"][:])  # same pixels, same batches
    np.testing.assert_allclose(tar_data["pullback"][4].astype(np.float32),  # row 4: label 2 == class 2
                               dir_data["pullback"][4].astype(np.float32), rtol=1e-3, atol=1e-6)
    assert tar_data.metadata["options"]["images"] == str(shards.resolve())
