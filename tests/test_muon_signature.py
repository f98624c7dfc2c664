"""muon.check_torch_muon: the private torch.optim._muon functions that ShardedMuon calls are checked against their
signatures when it is built, so that a torch that renamed one or made it take more stops the run at its start with one
line, not with a TypeError at the first step. Stand-ins for the module are plain namespaces holding functions."""

from types import SimpleNamespace

import pytest
import torch
from torch.optim import _muon

from cli import UserError
from muon import check_torch_muon


def newton_schulz_with_use_addmm(grad, ns_coefficients, ns_steps, eps, use_addmm):
    """A Newton-Schulz that takes one more required argument, as one revision of torch's does."""


def newton_schulz_with_an_option(grad, ns_coefficients, ns_steps, eps, use_addmm=False):
    """One more argument with a default: our call still binds."""


def test_this_torch_passes_and_its_functions_take_our_arguments():
    check_torch_muon()  # torch.optim._muon itself
    # the check is not vacuous: the calls it accepts run, as ShardedMuon makes them
    update = _muon._zeropower_via_newtonschulz(torch.randn(6, 4), (3.4445, -4.7750, 2.0315), 5, 1e-7)
    assert update.shape == (6, 4)
    assert _muon._adjust_lr(0.02, None, (12, 3)) == pytest.approx(0.02 * 2)  # sqrt(max(1, 12 / 3))


def test_an_optional_new_argument_is_accepted():
    check_torch_muon(SimpleNamespace(_zeropower_via_newtonschulz=newton_schulz_with_an_option,
                                     _adjust_lr=_muon._adjust_lr))


def check_error(module):
    with pytest.raises(UserError) as caught:
        check_torch_muon(module, version="2.99.0")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("torch 2.99.0: torch.optim._muon.")
    assert "use torch 2.9-2.13, or --optimizer=adamw" in message
    return message


def test_a_new_required_argument_is_one_line_naming_the_torch():
    message = check_error(SimpleNamespace(_zeropower_via_newtonschulz=newton_schulz_with_use_addmm,
                                          _adjust_lr=_muon._adjust_lr))
    assert "_zeropower_via_newtonschulz" in message and "use_addmm" in message and "_adjust_lr" not in message


def test_a_missing_function_is_one_line_naming_it():
    message = check_error(SimpleNamespace(_adjust_lr=_muon._adjust_lr))
    assert "_zeropower_via_newtonschulz" in message and "is missing" in message
    message = check_error(SimpleNamespace(_zeropower_via_newtonschulz=_muon._zeropower_via_newtonschulz,
                                          _adjust_lr_v2=_muon._adjust_lr))  # renamed
    assert "torch.optim._muon._adjust_lr, " in message and "is missing" in message
