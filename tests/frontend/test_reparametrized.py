"""Weight and spectral norms and pruning masks: baked into plain weights for an inference capture, in every form,
without touching the user's model; kept for QAT where the parametrizations train, refused in one line where they
cannot."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune, spectral_norm, weight_norm

from qcompile import capture
from qcompile.errors import CaptureError

NORMS = {"weight_norm": weight_norm, "spectral_norm": spectral_norm,
         "parametrizations.weight_norm": parametrizations.weight_norm,
         "parametrizations.spectral_norm": parametrizations.spectral_norm}


def _net(norm):
    torch.manual_seed(0)
    return nn.Sequential(norm(nn.Conv2d(3, 8, 3)), nn.ReLU(), nn.Flatten(), norm(nn.Linear(8 * 6 * 6, 5)))


@pytest.mark.parametrize("kind", list(NORMS))
def test_an_inference_capture_holds_plain_layers_with_the_computed_weights(kind):
    model = _net(NORMS[kind])
    x = torch.randn(4, 3, 8, 8)
    model(x).sum().backward()  # a forward with gradients: the old hooks leave a non-leaf weight behind
    model.eval()
    gm = capture(model, x[:1])
    for name in ("0", "3"):
        layer = gm.get_submodule(name)
        assert type(layer) in (nn.Conv2d, nn.Linear) and isinstance(layer.weight, nn.Parameter)
        assert not layer._forward_pre_hooks
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-6)
    assert parametrize.is_parametrized(model[0]) or model[0]._forward_pre_hooks  # the model is untouched
    model(x)


def test_old_checkpoints_load_into_the_parametrized_successor_and_compile_the_same(tmp_path):
    from qcompile.frontend.model_file import load_weights

    old = _net(weight_norm).eval()
    torch.save(old.state_dict(), tmp_path / "old.pt")
    new = _net(parametrizations.weight_norm)
    load_weights(new, tmp_path / "old.pt")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(capture(new.eval(), x[:1])(x), capture(old, x[:1])(x), rtol=1e-5, atol=1e-6)


def test_a_training_capture_keeps_parametrizations_and_refuses_the_old_hooks():
    gm = capture(_net(parametrizations.weight_norm).train(), torch.randn(2, 3, 8, 8))
    assert parametrize.is_parametrized(gm.get_submodule("0"))
    with pytest.raises(CaptureError, match=r"^0 uses torch.nn.utils.weight_norm \(deprecated hooks\).*"
                                           r"use torch.nn.utils.parametrizations.weight_norm"):
        capture(_net(weight_norm).train(), torch.randn(2, 3, 8, 8))


def _pruned():
    model = _net(lambda m: m)
    for m in (model[0], model[3]):
        prune.l1_unstructured(m, "weight", amount=0.5)
    return model


def test_a_pruned_model_compiles_with_its_masked_weights_also_from_a_checkpoint_loaded_after_pruning(tmp_path):
    """``torch.nn.utils.prune`` leaves ``weight`` a plain attribute that a pre-hook recomputes from
    ``weight_orig * weight_mask`` at each call; a checkpoint loaded since has not been applied to it yet."""
    trained = _pruned()
    with torch.no_grad():
        trained[0].weight_orig.mul_(3.0)
    torch.save(trained.state_dict(), tmp_path / "pruned.pt")
    model = _pruned().eval()
    model.load_state_dict(torch.load(tmp_path / "pruned.pt", weights_only=True))
    x = torch.randn(4, 3, 8, 8)
    gm = capture(model, x[:1])
    conv = gm.get_submodule("0")
    assert isinstance(conv.weight, nn.Parameter) and not conv._forward_pre_hooks
    assert torch.equal(conv.weight == 0, model[0].weight_mask == 0)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), rtol=1e-5, atol=1e-6)  # the model's own forward applies the mask
    assert hasattr(model[0], "weight_orig")  # the model is untouched


def test_a_training_capture_refuses_pruning_naming_the_fix():
    with pytest.raises(CaptureError, match=r"^0 is pruned with torch.nn.utils.prune.*prune.remove\(module, 'weight'\)"):
        capture(_pruned().train(), torch.randn(2, 3, 8, 8))
