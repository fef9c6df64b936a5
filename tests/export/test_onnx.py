"""ONNX export: parity with PyTorch is checked and recorded, a disagreeing graph is never written.

One real (dynamo) export per session (`exported_run`); tests that need another export reuse that graph
through `reuse_graph`, so the whole file stays fast.
"""
from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_colour_dataset

from effitune import bundle as bundles
from effitune.data.manifest import manifest_hash, read_manifest, write_manifest
from effitune.errors import UserError
from effitune.export import onnx as onnx_export
from effitune.export.onnx import export_onnx
from effitune.runtime import graph
from effitune.models.backbones import create_backbone
from effitune.models.network import Network
from effitune.predict import Predictor
from effitune.runtime.engines import OnnxEngine

SIZE = 32


def make_run(root: Path, per_class: int = 12) -> Path:
    """A run folder as `effitune train` leaves it: manifest.csv + a (random-init) model/ bundle."""
    data = make_colour_dataset(root / "data", per_class=per_class)
    rows = []
    for path in sorted(data.rglob("*.png")):
        index = int(path.stem.rsplit("_", 1)[1])
        split = "train" if index < per_class // 2 else "val" if index < 3 * per_class // 4 else "test"
        rows.append({"path": str(path), "label": path.parent.name, "split": split,
                     "sha1": hashlib.sha1(path.read_bytes()).hexdigest(), "width": 48, "height": 40})
    manifest = write_manifest(rows, root / "manifest.csv")
    torch.manual_seed(0)
    classes = sorted({row["label"] for row in rows})
    backbone, _ = create_backbone("tf_efficientnet_lite0", len(classes), pretrained=False)
    network = Network(backbone, (0.5,) * 3, (0.5,) * 3).eval()
    meta = {"classes": classes, "backbone": "tf_efficientnet_lite0", "manifest_sha1": manifest_hash(manifest),
            "preprocessing": {"size": SIZE, "mean": [0.5] * 3, "std": [0.5] * 3}, "metrics": {"accuracy": 0.4}}
    return bundles.save_bundle(root / "model", network.state_dict(), meta)


def first_image(bundle: Path) -> Path:
    """One of the run's images (the manifest's first row)."""
    return Path(read_manifest(bundle.parent / "manifest.csv")[0]["path"])


def copy_run(bundle: Path, destination: Path, keep: tuple[str, ...] = ()) -> Path:
    """Copy of the run (manifest + bundle) with only the `keep` exported files."""
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle.parent / "manifest.csv", destination / "manifest.csv")
    shutil.copytree(bundle, destination / "model", ignore=shutil.ignore_patterns("model*.onnx", "model*.tflite",
                                                                                   "model*.xml", "model*.bin"))
    for name in keep:
        shutil.copyfile(bundle / name, destination / "model" / name)
    if not keep:
        meta = bundles.read_meta(destination / "model")
        meta.pop("export", None)
        (destination / "model" / bundles.META_FILE).write_text(json.dumps(meta))
    return destination / "model"


@functools.cache
def _exported(basetemp: Path) -> Path:
    bundle = make_run(Path(basetemp) / "exported")
    export_onnx(bundle)
    return bundle


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory) -> Path:
    """A run whose bundle holds a real model.onnx (exported once per session; tests copy it to change it)."""
    return _exported(tmp_path_factory.getbasetemp())


@pytest.fixture
def reuse_graph(exported_run, monkeypatch):
    """Make `to_onnx` return the session's exported graph instead of exporting again."""
    graph = onnx.load(exported_run / "model.onnx")
    monkeypatch.setattr(onnx_export, "to_onnx", lambda network, size: (graph, "dynamo"))
    return graph


def images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def test_export_has_two_outputs_dynamic_batch_and_preprocessing(exported_run):
    model = onnx.load(exported_run / "model.onnx")
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == ["logits", "features"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert props["size"] == SIZE and props["mean"] == [0.5] * 3 and props["classes"] == ["blue", "green", "red"]
    assert "center crop" in props["resize"]
    engine = OnnxEngine(exported_run / "model.onnx")
    for n in (1, 5):
        logits, features = engine.run(images(n))
        assert logits.shape == (n, 3) and features.shape == (n, 1280)


def test_parity_is_measured_on_the_runs_images_and_recorded(exported_run):
    record = bundles.read_meta(exported_run)["export"]["onnx"]
    parity = record["parity"]
    assert parity["passed"] and parity["images"] == "test-split images" and parity["n"] == 9
    assert parity["max_abs_logit_diff"] < 1e-3 and parity["top1_agreement"] == 1.0
    assert record["bytes"] == (exported_run / "model.onnx").stat().st_size and record["exporter"] == "dynamo"


def test_disagreeing_export_is_refused_and_nothing_is_left(exported_run, reuse_graph, tmp_path):
    bundle = copy_run(exported_run, tmp_path / "run")
    gemm = next(node for node in reuse_graph.graph.node if node.op_type == "Gemm")
    weight = next(t for t in reuse_graph.graph.initializer if t.name == gemm.input[1])  # the classifier
    perturbed = onnx.numpy_helper.to_array(weight) * np.float32(1.01)  # a 1% error: what a broken op might do
    weight.CopyFrom(onnx.numpy_helper.from_array(perturbed, weight.name))
    with pytest.raises(UserError, match="model.onnx not written: ONNX Runtime disagrees with PyTorch"):
        export_onnx(bundle)
    assert sorted(p.name for p in bundle.iterdir() if "onnx" in p.name) == []
    assert "export" not in bundles.read_meta(bundle)


def test_predictor_backends_agree(exported_run):
    batch = images(6)
    torch_logits, torch_features = Predictor(exported_run, backend="torch").run(batch)
    auto = Predictor(exported_run)
    assert auto.backend == "onnx"  # model.onnx present, CPU
    onnx_logits, onnx_features = auto.run(batch)
    assert (onnx_logits.argmax(1) == torch_logits.argmax(1)).all()
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(onnx_features, torch_features, atol=1e-3, rtol=1e-3)


def test_missing_backend_file_names_the_command(exported_run, tmp_path):
    bundle = copy_run(exported_run, tmp_path / "run")
    assert Predictor(bundle).backend == "torch"
    with pytest.raises(UserError, match="effitune export .* --int8"):
        Predictor(bundle, backend="int8")
    with pytest.raises(UserError, match="Choose one of: auto, torch"):
        Predictor(bundle, backend="tensorrt")


def test_without_manifest_given_samples_or_noise_with_a_warning(exported_run, reuse_graph, tmp_path):
    lone = tmp_path / "lone"
    shutil.copytree(exported_run, lone, ignore=shutil.ignore_patterns("model*.onnx"))
    result = export_onnx(lone, samples=images(8))
    assert result["onnx"]["parity"]["images"] == "given images" and result["onnx"]["parity"]["n"] == 8
    with pytest.warns(UserWarning, match="random noise"):
        result = export_onnx(lone)
    assert result["onnx"]["parity"]["images"] == "random-noise images"
    with pytest.raises(UserError, match="shape"):
        export_onnx(lone, samples=images(2)[:, :16])


def test_fp16_keeps_float32_inputs_and_passes_its_gate(exported_run, reuse_graph, tmp_path):
    bundle = copy_run(exported_run, tmp_path / "run")
    result = export_onnx(bundle, fp16=True)["fp16"]
    assert result["parity"]["passed"] and result["bytes"] < 0.6 * (bundle / "model.onnx").stat().st_size
    model = onnx.load(bundle / "model.fp16.onnx")
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert Predictor(bundle, backend="fp16").logits(images(2)).dtype == np.float32
    assert set(bundles.read_meta(bundle)["export"]) == {"onnx", "fp16"}


def test_in_memory_engine_reproduces_pytorch_and_leaves_the_network_alone(exported_run):
    from effitune.runtime.batching import run_in_batches
    from effitune.runtime.engines import TorchEngine, load_network

    network = load_network(exported_run)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    images = np.random.default_rng(1).integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8)
    engine = graph.in_memory_engine(network, images)
    assert engine is not None and engine.path is None and not list(exported_run.parent.rglob("*.tmp"))
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    expected = run_in_batches(TorchEngine(network), images, 4)
    got = engine.run(images)
    np.testing.assert_allclose(got[0], expected[0], atol=1e-3)
    np.testing.assert_allclose(got[1], expected[1], atol=1e-3)


@pytest.mark.parametrize("failure", ["export", "logits", "features"])
def test_in_memory_engine_gives_way_to_pytorch_with_a_warning(exported_run, monkeypatch, failure):
    from effitune.runtime.engines import load_network

    if failure == "export":
        monkeypatch.setattr(graph, "torchscript_onnx", lambda *a: b"not an onnx graph")
    elif failure == "logits":
        monkeypatch.setattr(graph, "TOLERANCES", {"fp32": graph.Tolerance(-1.0, 1.0)})
    else:  # logits agree, the features (what the unknown-image statistics read) do not
        check = graph.check_parity
        monkeypatch.setattr(graph, "check_parity",
                            lambda *a: {**check(*a), "max_abs_feature_diff": 1.0})
    images = np.zeros((4, SIZE, SIZE, 3), np.uint8)
    with pytest.warns(UserWarning, match="PyTorch instead of ONNX Runtime"):
        assert graph.in_memory_engine(load_network(exported_run), images) is None


@pytest.mark.parametrize("beyond, expected", [(-1, "torch"), (0, "onnx")])
def test_a_pass_uses_onnx_runtime_only_when_long_enough_to_repay_the_export(exported_run, beyond, expected):
    predictor = Predictor(exported_run, backend="torch")
    sample = np.zeros((4, SIZE, SIZE, 3), np.uint8)
    assert predictor.pass_engine(sample, Predictor.long_pass + beyond).name == expected
    assert Predictor(exported_run, backend="onnx").pass_engine(sample, 10_000).path is not None  # its own file


def test_evaluate_and_report_passes_run_in_onnx_runtime_with_the_same_results(exported_run, monkeypatch, tmp_path):
    from effitune.evaluate.evaluate import evaluate_bundle
    from effitune.data.sources import read_source
    from effitune.predict import embed

    copy = copy_run(exported_run, tmp_path / "torch-only")  # no model.onnx: the bundle is served by PyTorch
    manifest = copy.parent / "manifest.csv"
    rows = read_source(manifest).rows
    slow = evaluate_bundle(copy, manifest), embed(Predictor(copy), rows)
    calls = []
    monkeypatch.setattr(Predictor, "long_pass", 1)
    monkeypatch.setattr(OnnxEngine, "run", lambda self, images, run=OnnxEngine.run: calls.append(1) or run(self, images))
    fast = evaluate_bundle(copy, manifest), embed(Predictor(copy), rows)
    assert len(calls) >= 4  # two parity checks and two passes
    assert fast[0]["accuracy"] == slow[0]["accuracy"]
    np.testing.assert_allclose(fast[1].logits, slow[1].logits, atol=1e-3)


def test_drift_and_unknown_image_passes_run_in_onnx_runtime_with_the_same_results(exported_run, monkeypatch, tmp_path):
    from effitune.predict import embed

    copy = copy_run(exported_run, tmp_path / "torch-only")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    sources = [exported_run.parent / "data", tmp_path / "broken.png"]
    slow = embed(Predictor(copy), sources, chunk=7)
    assert len(slow.paths) > 7  # several chunks
    calls = []
    monkeypatch.setattr(Predictor, "long_pass", len(slow.paths))
    monkeypatch.setattr(OnnxEngine, "run", lambda self, images, run=OnnxEngine.run: calls.append(1) or run(self, images))
    fast = embed(Predictor(copy), sources, chunk=7)
    assert len(calls) > 1  # the parity check, then the pass
    assert fast.paths == slow.paths and fast.failed == slow.failed == [str(tmp_path / "broken.png")]
    np.testing.assert_allclose(fast.logits, slow.logits, atol=1e-3)
    np.testing.assert_allclose(fast.features, slow.features, atol=1e-3)


def test_a_pass_goes_on_in_pytorch_when_onnx_runtime_fails_midway(exported_run, monkeypatch):
    predictor = Predictor(exported_run, backend="torch")
    images = np.random.default_rng(2).integers(0, 256, (12, SIZE, SIZE, 3), dtype=np.uint8)

    class FailsAfterOneChunk:
        calls = 0

        def run(self, batch):
            self.calls += 1
            if self.calls > 1:
                raise RuntimeError("arena exhausted")
            return predictor.engine.run(batch)

    monkeypatch.setattr(Predictor, "long_pass", 1)
    predictor._in_memory = FailsAfterOneChunk()  # as if exported and checked
    with pytest.warns(UserWarning, match="arena exhausted.*going on in PyTorch"):
        logits, features = predictor.run_pass((images[i:i + 4] for i in range(0, 12, 4)), len(images))
    expected = predictor.run(images)
    np.testing.assert_allclose(logits, expected[0], atol=1e-5)
    assert features.shape == expected[1].shape


def test_a_long_predict_stream_runs_in_onnx_runtime_with_the_same_answers(exported_run, monkeypatch, tmp_path):
    """`effitune predict` over a folder: a stream of `long_pass` files or more runs in ONNX Runtime (the
    bundle has no model.onnx), unreadable files still get their error line in order; a short one stays in PyTorch."""
    copy = copy_run(exported_run, tmp_path / "torch-only")
    data = exported_run.parent / "data"
    (tmp_path / "broken.png").write_bytes(b"not an image")
    sources = [data, tmp_path / "broken.png", tmp_path / "missing.png"]
    slow = Predictor(copy).predict(sources)
    calls = []
    monkeypatch.setattr(OnnxEngine, "run", lambda self, images, run=OnnxEngine.run: calls.append(1) or run(self, images))
    monkeypatch.setattr(Predictor, "long_pass", len(slow))
    short = Predictor(copy)
    assert [r.get("label") for r in short.predict(sources[:1])] == [r["label"] for r in slow[:-2]]
    assert not calls and short._in_memory is None
    fast = Predictor(copy).predict(sources, batch_size=5)
    assert len(calls) > 1  # the parity check, then the stream's batches
    assert [r["path"] for r in fast] == [r["path"] for r in slow]
    assert [r.get("label") for r in fast] == [r.get("label") for r in slow]
    assert [r.get("error") for r in fast[-2:]] == [r.get("error") for r in slow[-2:]] and "error" in fast[-1]
    np.testing.assert_allclose([r["probability"] for r in fast[:-2]], [r["probability"] for r in slow[:-2]],
                               atol=1e-4)


def test_the_first_results_of_a_slow_stream_need_not_wait_for_the_lookahead(exported_run):
    pulled = []

    def camera():  # sources that arrive one by one
        for path in sorted((exported_run.parent / "data").rglob("*.png"))[:3]:
            pulled.append(path)
            yield path

    results = Predictor(exported_run, backend="torch").iter_predict(camera(), batch_size=1, lookahead=False)
    assert "label" in next(results) and len(pulled) == 1


def test_server_threads_sharing_a_predictor_export_once(exported_run, monkeypatch):
    import threading
    import time

    exports = []

    def slow_export(network, sample):
        exports.append(1)
        time.sleep(0.2)
        return None  # as if the check failed: PyTorch
    monkeypatch.setattr(graph, "in_memory_engine", slow_export)
    predictor = Predictor(exported_run, backend="torch")
    sample = images(2)
    threads = [threading.Thread(target=predictor.pass_engine, args=(sample, 10_000)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert exports == [1] and predictor.pass_engine(sample, 10_000) is predictor.engine


def test_run_on_a_long_array_uses_the_pass_engine(exported_run, monkeypatch, tmp_path):
    predictor = Predictor(copy_run(exported_run, tmp_path / "torch-only"))
    batch = images(6)
    slow = predictor.run(batch)
    monkeypatch.setattr(Predictor, "long_pass", 6)
    fast = predictor.run(batch)
    assert predictor._in_memory and predictor.pass_engine(batch, 6).name == "onnx"
    np.testing.assert_allclose(fast[0], slow[0], atol=1e-4)


def test_legacy_graph_pads_fold_into_the_convolutions_and_the_network_is_left_alone(tmp_path):
    """tf_* backbones pad "SAME" at run time; the in-memory graph must give ONNX Runtime constant pads it
    can fold into each Conv (no Pad, no shape arithmetic left), and the network must come back unchanged."""
    import onnxruntime as ort

    backbone, _ = create_backbone("tf_efficientnet_lite0", 3, pretrained=False)
    network = Network(backbone, (0.5,) * 3, (0.5,) * 3).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        before = network(images)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # portable rewrites only
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(graph.torchscript_onnx(network, 64), options, providers=["CPUExecutionProvider"])
    operations = {node.op_type for node in onnx.load(tmp_path / "optimized.onnx").graph.node}
    assert not operations & {"Pad", "Shape", "Ceil"}, operations
    assert not any("forward" in vars(layer) for layer in network.modules())
    wrapper = torch.nn.Sequential(network)  # a new module trains; torch.onnx would hand that mode to all inside
    network.backbone.classifier.train()  # one layer left training on purpose: it must stay so
    graph.torchscript_graph(wrapper, (images,), ["images"], ["logits"], graph.OPSET)
    assert wrapper.training and network.backbone.classifier.training
    assert not any(layer.training for layer in network.backbone.blocks.modules())
    network.backbone.classifier.eval()
    with torch.no_grad():
        assert torch.equal(network(images), before)
        assert network(torch.rand(1, 3, 80, 72)).shape == before[:1].shape  # any size again


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_large_100", "tf_efficientnetv2_b0"])
def test_in_memory_engine_serves_other_backbone_families(name):
    """Training's pass on a CPU uses this engine for any backbone: PyTorch-padded, MobileNet and V2 graphs too."""
    backbone, _ = create_backbone(name, 3, pretrained=False)
    images = np.random.default_rng(3).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    assert graph.in_memory_engine(Network(backbone, (0.5,) * 3, (0.5,) * 3).eval(), images) is not None


def test_an_exported_file_from_other_weights_or_damaged_is_refused_or_bypassed(exported_run, tmp_path):
    """A model.onnx copied from another bundle, left from before a re-train, or damaged: `--backend onnx`
    refuses it with the fix; `auto` (the default) runs PyTorch instead with a warning, never wrong answers."""
    copy = copy_run(exported_run, tmp_path / "stale", keep=("model.onnx",))
    record = bundles.read_meta(copy)["export"]
    assert Predictor(copy).backend == "onnx"  # a whole copy of a bundle keeps its exported file
    bundles.update_meta(copy, export={})  # model.onnx from another bundle: not recorded in this one
    with pytest.raises(UserError, match="is not recorded in .*Export it again"):
        Predictor(copy, backend="onnx")
    bundles.update_meta(copy, export=record)  # as exported...
    state = bundles.read_weights(copy)
    first = next(iter(state))
    state[first] = state[first] + 0.01  # ...then re-trained
    from safetensors.torch import save_file
    save_file(state, copy / bundles.WEIGHTS_FILE)
    with pytest.raises(UserError, match="exported from other weights than this bundle's"):
        Predictor(copy, backend="onnx")
    with pytest.warns(UserWarning, match="running in PyTorch instead"):
        assert Predictor(copy).backend == "torch"
    (copy / "model.onnx").write_bytes(b"junk")
    bundles.update_meta(copy, export={"onnx": {**bundles.read_meta(copy)["export"]["onnx"],
                                               "weights_sha1": bundles.weights_fingerprint(copy)}})
    with pytest.raises(UserError, match="model.onnx cannot be read"):
        Predictor(copy, backend="onnx")
    assert Predictor(exported_run).backend == "onnx"  # the genuine article still runs
