"""The activation table: its entries are consistent, and every derived table agrees with it."""

import inspect

import pytest
import torch

import excitation
import excitation.kernels as kernels
from excitation.fxpass.rules import KIND_TO_RULE, rules_table
from excitation.fxpass.sites import ACTIVATION_CALL_NAMES
from excitation.presets import PRESETS
from excitation.spec import ACTIVATIONS, GATED_KINDS, SPECS, op_arguments, spec_temp

SITE_SPECS = [spec for spec in ACTIVATIONS if spec.variant_of is None]


def _is_aten(target):
    return isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))


def test_kinds_are_unique_and_every_variant_names_a_kind_of_its_rule():
    assert len(SPECS) == len(ACTIVATIONS)
    for spec in ACTIVATIONS:
        if spec.variant_of is not None:
            assert SPECS[spec.variant_of].rule == spec.rule and spec.forward is not None


def test_no_callable_or_module_class_belongs_to_two_kinds():
    owner = {}
    for spec in ACTIVATIONS:
        for form in spec.functions:
            for target in form.targets:
                assert owner.setdefault(("function", target), spec.kind) == spec.kind, target
        for form in spec.methods:
            for name in form.targets:
                assert owner.setdefault(("method", name), spec.kind) == spec.kind, name
        for form in spec.modules:
            assert owner.setdefault(("module", form.type), spec.kind) == spec.kind, form.type


def test_explicit_parameters_are_the_callables_own():
    # Where torch declares a Python signature, the table's parameter names must be its names, in order.
    checked = 0
    for spec in ACTIVATIONS:
        for form in spec.functions:
            for target in form.targets:
                if _is_aten(target) or form.params is None:
                    continue
                try:
                    parameters = list(inspect.signature(target).parameters.values())
                except (TypeError, ValueError):  # a builtin without a signature
                    continue
                if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters):
                    continue
                names = ["input"] + [p.name for p in parameters[1:]]
                assert [name for name, _ in form.params] == names[: len(form.params)], (spec.kind, target)
                checked += 1
    assert checked >= 20


def test_module_attributes_exist_on_a_default_instance():
    for spec in ACTIVATIONS:
        for form in spec.modules:
            if form.type in (torch.nn.MaxPool1d, torch.nn.MaxPool2d, torch.nn.MaxPool3d):
                module = form.type(2)
            elif form.type.__name__.startswith("Adaptive"):
                module = form.type(1)
            elif form.type is torch.nn.Threshold:
                module = form.type(0.1, 0.0)
            else:
                module = form.type()
            for name in form.attributes:
                assert hasattr(module, name), (form.type, name)


def test_every_gated_kind_has_its_surrogate_with_the_tables_signature():
    for spec in SITE_SPECS:
        if spec.forward is None:
            continue
        function = getattr(kernels, f"surrogate_{spec.kind}")
        assert function is kernels.SURROGATES[spec.kind] and function in kernels.SURROGATE_FUNCTIONS
        parameters = inspect.signature(function).parameters
        assert list(parameters) == ["input", *(name for name, _ in spec.params), "temp"]
        assert parameters["temp"].default == spec_temp(spec, "paper")


def test_surrogates_bind_positional_and_keyword_arguments_and_refuse_unknown_ones():
    z = torch.randn(5, dtype=torch.float64)
    a = kernels.surrogate_hardtanh(z, 0.0, 6.0, 0.5)
    b = kernels.surrogate_hardtanh(z, max_val=6.0, min_val=0.0, temp=0.5)
    assert torch.equal(a, b) and torch.equal(a, torch.nn.functional.relu6(z))
    with pytest.raises(TypeError, match="unexpected keyword argument .slope."):
        kernels.surrogate_hardtanh(z, slope=0.1)
    with pytest.raises(TypeError, match="takes from 1 to 4 positional"):
        kernels.surrogate_hardtanh(z, 0.0, 6.0, 0.5, 1.0)


def test_op_arguments_encode_the_sites_constants():
    assert op_arguments("hardtanh", {"min_val": 0, "max_val": 6}) == ("hardtanh", [0.0, 6.0])
    assert op_arguments("elu", {"alpha": 0.5}) == ("elu", [0.5, 1.0, 1.0])
    assert op_arguments("gelu", {"approximate": "tanh"}) == ("gelu_tanh", [])
    assert op_arguments("gelu", {}) == ("gelu", [])
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        op_arguments("gelu", {"approximate": "erf"})
    assert set(GATED_KINDS) == {spec.kind for spec in ACTIVATIONS if spec.forward is not None}


def test_default_temperatures_follow_the_presets():
    for name, preset in PRESETS.items():
        assert spec_temp(SPECS["relu"], name) == preset.temp == spec_temp(SPECS["threshold"], name)
        assert spec_temp(SPECS["max_pool2d"], name) == preset.pool_temp
        assert spec_temp(SPECS["silu"], name) == 1.6 and spec_temp(SPECS["gelu"], name) == 1.0


def test_rules_are_the_tables_in_its_order():
    table_rules = list(dict.fromkeys(spec.rule for spec in SITE_SPECS))
    assert list(excitation.RULES)[: len(table_rules)] == table_rules
    assert list(excitation.RULES)[len(table_rules):] == ["layer_norm", "rms_norm", "attention"]
    for spec in ACTIVATIONS:
        assert KIND_TO_RULE[spec.kind] == spec.rule
        if spec.variant_of is None:
            assert spec.kind in excitation.RULES[spec.rule].kinds
    table = rules_table()
    for rule in excitation.RULES:
        assert f"| `{rule}` |" in table
    assert "`nn.Threshold`" in table and "`nn.RReLU` in eval mode" in table


def test_the_dynamo_census_counts_every_form_of_the_table():
    for spec in ACTIVATIONS:
        for form in spec.functions:
            for target in form.targets:
                if not _is_aten(target):
                    assert target.__name__.lstrip("_") in ACTIVATION_CALL_NAMES, target
        for form in spec.methods:
            assert set(form.targets) <= ACTIVATION_CALL_NAMES
