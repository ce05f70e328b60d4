"""load_weights accepts exactly what PyTorch's strict load_state_dict accepts, once training containers and
DataParallel / torch.compile prefixes are taken off; what it refuses is one line naming the keys."""

import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from qcompile.cli import main
from qcompile.errors import CheckpointError, DataError
from qcompile.frontend.model_file import check_labels, hook_batches, load_model_file, load_weights
from tests.conftest import TinyNet, randomize_bn

BN_MODULES = ("stem_bn", "body_bn")
BN_VERSIONS = {"bn_v1": 1, "bn_v2": 2}


def trained(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(TinyNet(), seed=seed)


def legacy(state: OrderedDict, case: str, prefix: str = "") -> OrderedDict:
    """``state`` as an older PyTorch saved it: no ``num_batches_tracked``; no metadata, or BN at a version."""
    out = OrderedDict((k, v) for k, v in state.items() if case == "current" or not k.endswith("num_batches_tracked"))
    if case == "no_metadata":
        return out
    out._metadata = copy.deepcopy(state._metadata)
    for name in BN_MODULES if case in BN_VERSIONS else ():
        out._metadata[prefix + name]["version"] = BN_VERSIONS[case]
    return out


def pytorch_accepts(state: OrderedDict) -> bool:
    try:
        TinyNet().load_state_dict(state, strict=True)
    except RuntimeError:
        return False
    return True


def assert_loaded(model: nn.Module, state: dict) -> None:
    loaded = model.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


def test_weights_only_load_keeps_metadata(tmp_path):
    state = trained().state_dict()
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert loaded._metadata == state._metadata and loaded._metadata["stem_bn"]["version"] == 2


@pytest.mark.parametrize(
    ("case", "loads"),
    [("current", True), ("no_metadata", True), ("bn_v1", True), ("bn_v2", False)],
)
def test_legacy_checkpoint_loads_exactly_when_pytorch_does(case, loads, tmp_path):
    model = trained()
    plain = legacy(model.state_dict(), case)
    wrapped = legacy(nn.DataParallel(model).state_dict(), case, prefix="module.")
    torch.save({"state_dict": wrapped, "best_prec1": 91.2, "epoch": 200}, tmp_path / "w.pt")
    assert pytorch_accepts(plain) is loads
    target = TinyNet()
    if loads:
        load_weights(target, tmp_path / "w.pt")
        assert_loaded(target, plain)
    else:
        with pytest.raises(CheckpointError, match=r"2 missing \(stem_bn.num_batches_tracked, body_bn"):
            load_weights(target, tmp_path / "w.pt")


@pytest.mark.parametrize("prefix", ["module.", "module.module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(prefix, tmp_path):
    state = trained().state_dict()
    torch.save({f"{prefix}{k}": v for k, v in state.items()}, tmp_path / "w.pt")
    model = TinyNet()
    load_weights(model, tmp_path / "w.pt")
    assert_loaded(model, state)


@pytest.mark.parametrize("case", ["current", "no_metadata", "bn_v1"])
def test_a_framework_wrapper_prefix_is_dropped_with_a_note(case, tmp_path):
    """PyTorch Lightning saves ``{"state_dict": {"model.<key>": ...}}`` for a LightningModule holding the net."""

    class Wrapper(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.model = net

    model = trained()
    state = legacy(model.state_dict(), case)
    torch.save({"state_dict": legacy(Wrapper(model).state_dict(), case, prefix="model."), "epoch": 3,
                "pytorch-lightning_version": "2.4.0"}, tmp_path / "w.ckpt")
    target = TinyNet()
    notes = load_weights(target, tmp_path / "w.ckpt")
    assert_loaded(target, state)
    assert notes == [f"checkpoint {tmp_path / 'w.ckpt'}: every key began with 'model.' (a training wrapper's "
                     "attribute), which was dropped"]
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    assert load_weights(TinyNet(), tmp_path / "plain.pt") == []


def test_a_prefix_the_model_has_is_not_dropped(tmp_path):
    """Keys that all start with one of the model's own submodules are the model's keys, not a wrapper's."""
    state = {k: v for k, v in trained().state_dict().items() if k.startswith("stem.")}
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(TinyNet(), tmp_path / "w.pt")


@pytest.mark.parametrize("saved", [lambda m: m, lambda m: {"model": m, "epoch": 1}], ids=["model", "in_dict"])
def test_a_pickled_model_is_one_line_saying_how_to_resave(saved, tmp_path):
    torch.save(saved(trained()), tmp_path / "w.pt")
    with pytest.raises(CheckpointError) as err:
        load_weights(TinyNet(), tmp_path / "w.pt")
    msg = str(err.value)
    assert "\n" not in msg and "\x1b" not in msg
    assert "holds a pickled Python object (tests.conftest.TinyNet)" in msg
    assert "torch.save(model.state_dict(), PATH)" in msg


def _truncated(path):
    torch.save(trained().state_dict(), path)
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize("write, line", [
    (_truncated, "is truncated or damaged: its zip archive cannot be read"),
    (lambda path: path.write_text("hello"), "is not a file torch.save wrote (it starts with b'hell'); pass the state "
                                            "dict saved with torch.save(model.state_dict(), PATH)"),
    (lambda path: path.write_bytes(b"\x93NUMPY\x01\x00"), "is not a file torch.save wrote (it starts with "
                                                            "b'\\x93NUM')"),
    (lambda path: path.write_bytes(b""), "is empty"),
], ids=["truncated", "text", "numpy", "empty"])
def test_a_file_torch_save_did_not_write_is_one_line_saying_so(write, line, tmp_path):
    """Not the library's internal message (miniz's paragraph, "KeyError: 101"), but what the file is."""
    write(tmp_path / "w.pt")
    with pytest.raises(CheckpointError) as err:
        load_weights(TinyNet(), tmp_path / "w.pt")
    assert str(err.value).startswith(f"checkpoint {tmp_path / 'w.pt'} {line}"), str(err.value)


@pytest.mark.parametrize(
    "container",
    [
        lambda s: s,
        lambda s: {"model": s, "optimizer": {"lr": 0.1}},
        lambda s: {"model_state_dict": s, "epoch": 3},
        lambda s: {"net": s},
        lambda s: {"model": {"state_dict": s}, "best_prec1": 91.2},
    ],
    ids=["bare", "model", "model_state_dict", "net", "nested"],
)
def test_containers_are_unwrapped(container, tmp_path):
    state = trained().state_dict()
    torch.save(container(state), tmp_path / "w.pt")
    model = TinyNet()
    load_weights(model, tmp_path / "w.pt")
    assert_loaded(model, state)


def test_weights_key_picks_the_ema_weights(tmp_path):
    live, ema = trained(1).state_dict(), trained(2).state_dict()
    torch.save({"state_dict": live, "model_ema": ema, "epoch": 90}, tmp_path / "w.pt")
    model = TinyNet()
    load_weights(model, tmp_path / "w.pt")
    assert_loaded(model, live)
    load_weights(model, tmp_path / "w.pt", key="model_ema")
    assert_loaded(model, ema)
    with pytest.raises(CheckpointError, match=r"no entry 'ema' \(weights_key; found: state_dict, model_ema, epoch"):
        load_weights(model, tmp_path / "w.pt", key="ema")


def _drop(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda s: _drop(s, "head.bias"), ["1 missing (head.bias)"]),
        (lambda s: {**s, "extra.weight": torch.zeros(2)}, ["1 unexpected (extra.weight)"]),
        (lambda s: {**s, "head.weight": torch.zeros(3, 8)},
         ["1 shape mismatches (head.weight (3, 8) vs model (5, 8))"]),
        (lambda s: {**_drop(s, "stem.weight"), "stem.wieght": s["stem.weight"]},
         ["1 missing (stem.weight)", "1 unexpected (stem.wieght)"]),
    ],
    ids=["missing", "unexpected", "shape", "renamed"],
)
def test_mismatch_is_one_line_naming_the_keys(edit, fragments, tmp_path):
    torch.save(edit(trained().state_dict()), tmp_path / "w.pt")
    with pytest.raises(CheckpointError) as info:
        load_weights(TinyNet(), tmp_path / "w.pt")
    message = str(info.value)
    assert "\n" not in message and "does not match the model" in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ({"state_dict": {"head.bias": torch.zeros(5), "head.note": "ok"}},
         "entry 'head.note' of its state dict is a str"),
        ({"model_ema": {"head.bias": torch.zeros(5)}, "epoch": 3},
         "its keys: model_ema, epoch (pick one with weights_key)"),
        ([torch.zeros(3)], "not a state dict"),
    ],
    ids=["non_tensor_value", "only_ema", "list"],
)
def test_not_a_state_dict(content, fragment, tmp_path):
    torch.save(content, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="^checkpoint .*w.pt: ") as info:
        load_weights(TinyNet(), tmp_path / "w.pt")
    assert fragment in str(info.value) and "\n" not in str(info.value)


class Payload:
    """Unpickling this creates a file: what weights_only must never let happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": Payload(marker)}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_weights(TinyNet(), tmp_path / "w.pt")
    assert not marker.exists()


MODEL_FILE = """
import torch
from torch import nn


def build_model(classes=2):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, classes))


def example_input():
    return torch.randn(1, 3, 8, 8)
"""


@pytest.fixture
def tiny_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(MODEL_FILE)
    return path


def _cli(tiny_file, tmp_path, capsys, *args):
    out = tmp_path / "out"
    code = main([str(tiny_file), "--recipe", "bf16", "--backend", "none", "--quiet", "--out", str(out), *args])
    return code, capsys.readouterr()


def test_cli_mismatch_is_one_stderr_line(tiny_file, tmp_path, capsys):
    other = load_model_file(tiny_file).build(classes=3)
    torch.save({"state_dict": other.state_dict(), "epoch": 1}, tmp_path / "w.pt")
    code, captured = _cli(tiny_file, tmp_path, capsys, "--weights", str(tmp_path / "w.pt"))
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcompile: error: checkpoint "), captured.err
    assert "2 shape mismatches (5.weight (3, 4) vs model (2, 4), 5.bias (3,) vs model (2,))" in lines[0]


def test_cli_weights_key_loads_a_legacy_ema_checkpoint(tiny_file, tmp_path, capsys):
    ema = legacy(nn.DataParallel(load_model_file(tiny_file).build()).state_dict(), "no_metadata")
    torch.save({"state_dict": {"junk": torch.zeros(1)}, "model_ema": ema}, tmp_path / "w.pt")
    weights = str(tmp_path / "w.pt")
    code, captured = _cli(tiny_file, tmp_path, capsys, "--weights", weights, "--weights-key", "model_ema")
    assert code == 0, captured.err
    code, captured = _cli(tiny_file, tmp_path, capsys, "--weights-key", "model_ema")
    assert code == 2 and captured.err.strip() == "qcompile: error: --weights-key applies to --weights"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_compiled_from_its_exact_float32_values(dtype, tmp_path):
    """A model built in half precision: made float32 before the checkpoint loads (a float32 checkpoint is then not
    rounded to half), with a warning."""
    path = tmp_path / "half.py"
    path.write_text(MODEL_FILE.replace("nn.Flatten(), nn.Linear(4, classes))",
                                       f"nn.Flatten(), nn.Linear(4, classes)).to(torch.{dtype})"))
    with pytest.warns(UserWarning, match=f"holds {str(dtype)[6:]} tensors; it is compiled from their float32"):
        model = load_model_file(path).build()
    assert all(t.dtype == torch.float32 for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    load_weights(model, _saved(state, tmp_path))
    assert torch.equal(model[0].weight, state["0.weight"])


def _saved(state, tmp_path):
    torch.save(state, tmp_path / "w.pt")
    return tmp_path / "w.pt"


@pytest.mark.parametrize(("forward", "hint"), [
    ("x.reshape(1, 12)", "it runs on example_input() at batch size 1: does it assume that batch size?"),
    ("x.view(1, -1, 7)", "it fails on example_input() too"),
])
def test_a_model_failing_on_a_batch_says_whether_it_runs_on_the_example(forward, hint):
    from qcompile.errors import DataError
    from qcompile.frontend.model_file import check_batches

    class Flat(nn.Module):
        def forward(self, x):
            return eval(forward)

    batch = [(torch.randn(4, 3, 2, 2), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(DataError) as err:
        check_batches(Flat(), (torch.randn(1, 3, 2, 2),), batch, "calibration")
    assert "the model fails on the first calibration batch, of shape (4, 3, 2, 2)" in str(err.value)
    assert str(err.value).endswith(f"; {hint}")


def test_a_safetensors_checkpoint_loads_like_a_state_dict(tmp_path):
    from safetensors.torch import save_file

    model = randomize_bn(TinyNet())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    fresh = TinyNet()
    load_weights(fresh, tmp_path / "w.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"^cannot read safetensors checkpoint .*bad.safetensors: "):
        load_weights(fresh, tmp_path / "bad.safetensors")


def test_a_safetensors_checkpoint_without_the_package_says_what_to_install(tmp_path, monkeypatch):
    import sys

    (tmp_path / "w.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # the import fails
    with pytest.raises(CheckpointError, match=r"needs the safetensors package: pip install 'qcompile\[safetensors\]'"):
        load_weights(TinyNet(), tmp_path / "w.safetensors")


@pytest.mark.parametrize(("example", "inputs", "held"), [
    ((torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)), (torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)), "a tuple"),
    ((torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2)), torch.randn(4, 3, 2, 2), "a tensor"),
])
def test_data_for_a_model_of_several_inputs_is_refused_in_one_line(example, inputs, held):
    from qcompile.errors import DataError
    from qcompile.frontend.model_file import check_batches

    with pytest.raises(DataError, match=f"^the calibration batches' inputs are {held} and example_input\\(\\) gives 2 "
                                        "tensor\\(s\\): calibration, accuracy and verification take models of one"):
        check_batches(nn.Identity(), example, [(inputs, torch.zeros(4, dtype=torch.long))], "calibration")


def _batch(labels: object) -> tuple[torch.Tensor, object]:
    return torch.zeros(3, 3, 4, 4), labels


@pytest.mark.parametrize("batch, labels", [
    (_batch(torch.tensor([2, 0, 1])), [2, 0, 1]),
    (_batch(torch.eye(3)[[2, 0, 1]]), [2, 0, 1]),  # one-hot
    (_batch(torch.tensor([[0.1, 0.2, 0.7], [0.8, 0.1, 0.1], [0.3, 0.4, 0.3]])), [2, 0, 1]),  # soft labels
    (_batch(torch.tensor([[2], [0], [1]])), [2, 0, 1]),
    (_batch(torch.tensor([2.0, 0.0, 1.0])), [2, 0, 1]),
    (_batch([2, 0, 1]), [2, 0, 1]),
    (torch.zeros(3, 3, 4, 4), None),  # calibration images alone
    ((np.zeros((3, 3, 4, 4), np.float32), np.array([2, 0, 1])), [2, 0, 1]),
    (np.zeros((3, 3, 4, 4), np.float32), None),
])
def test_hook_batches_are_read_as_images_and_class_indices(batch, labels):
    [(inputs, got)] = list(hook_batches([batch], "calibration_data", labelled=False))
    assert isinstance(inputs, torch.Tensor) and inputs.shape == (3, 3, 4, 4)
    assert got is None if labels is None else (got.dtype == torch.int64 and got.tolist() == labels)


@pytest.mark.parametrize("batch, line", [
    (torch.zeros(3, 3, 4, 4), "eval_data() yields a Tensor; it must yield (inputs, labels) pairs"),
    ({"pixel_values": torch.zeros(3, 3, 4, 4), "labels": torch.zeros(3)},
     "eval_data() yields dicts (keys 'pixel_values', 'labels'); yield (inputs, labels) pairs instead"),
    ((torch.zeros(3, 3, 4, 4), torch.zeros(3), "path"), "eval_data() yields a tuple of 3 items; it must yield"),
])
def test_hook_batches_of_another_form_are_one_line(batch, line):
    with pytest.raises(DataError) as caught:
        list(hook_batches([batch], "eval_data", labelled=True))
    assert str(caught.value).startswith(line) and "\n" not in str(caught.value)


def test_labels_past_the_logits_are_refused_and_more_logits_than_classes_warned():
    check_labels(10, torch.tensor([0, 9]), "evaluation")
    with pytest.raises(DataError, match=r"labels run from -1 to 3 but the model gives 10 logits"):
        check_labels(10, torch.tensor([-1, 3]), "evaluation")
    with pytest.raises(DataError, match=r"labels run from 0 to 10 \(11 classes\) but the model gives 10 logits"):
        check_labels(10, torch.tensor([0, 10]), "training", [f"c{i}" for i in range(11)])
    with pytest.warns(UserWarning, match=r"the model gives 1000 logits and the evaluation data has 10 classes"):
        check_labels(1000, torch.tensor([0, 9]), "evaluation", [f"c{i}" for i in range(10)])
