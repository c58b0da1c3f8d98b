"""The pass: every site of a selected rule -> a surrogate op, with a report of what changed.

:func:`excite_graph` edits a GraphModule we own (a traced clone, a copy of the
user's GraphModule, or a graph dynamo hands to our backend).  :func:`excite`
is the public entry point that produces such a GraphModule from a model.

Why one module: the pass, its option checks and the report it builds change together
whenever a rule is added.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import replace
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn
from torch import fx

from ..errors import ExcitationError, InplaceAliasError, with_suggestions
from ..gates import check_temp
from ..kernels import ExcitedMultiheadAttention, surrogate_max_pool2d, surrogate_relu
from ..kernels.fused import batch_norm_relu
from .excited import REPORT_ATTR, make_excited
from .fusion import fuse_batch_norm_relu, unfuse
from .recompute import recompute_cheap_convolutions
from .report import Report, Site, Unhandled
from .options import Options, TempsSpec, options_from
from .rules import RulesSpec
from .sites import (
    SITE_NAME_META,
    SITE_NODE_META,
    SiteMatch,
    match_site,
    match_unhandled,
    site_name,
    surrogate_call,
)
from .tracing import clone_module_tree, copy_graph_module, trace

__all__ = ["excite", "excite_graph", "report", "is_excited"]


# Ops whose output may share memory with their input: an in-place ReLU on any
# member of such a family changes what the others read.
_VIEW_METHODS = frozenset(
    """view view_as reshape reshape_as flatten unflatten transpose permute squeeze unsqueeze
    narrow expand expand_as t T mT select split chunk unbind diagonal movedim moveaxis
    swapaxes swapdims as_strided unfold detach __getitem__ real imag""".split()
)
_VIEW_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze,
    torch.narrow, torch.split, torch.chunk, torch.unbind, torch.select, torch.diagonal,
    torch.movedim, torch.swapaxes, torch.t, torch.detach, torch.as_strided, operator.getitem,
}


def _is_view(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        # Unpacking (values, indices) of a max-pool gives two separate tensors.
        source = match_site(gm, node.args[0])
        return source is None or not source.returns_tuple
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        if node.target in _VIEW_FUNCTIONS:
            return True
        schema = getattr(node.target, "_schema", None)  # ATen overloads declare aliasing
        return bool(schema is not None and schema.returns and schema.returns[0].alias_info is not None
                    and not schema.returns[0].alias_info.is_write)
    return False


def _alias_family(node: fx.Node, gm: fx.GraphModule) -> List[fx.Node]:
    """``node``'s view ancestors and every view derived from them (excluding ``node``)."""
    root = node
    while _is_view(root, gm) and root.args and isinstance(root.args[0], fx.Node):
        root = root.args[0]
    family, stack = [], [root]
    seen = {root}
    while stack:
        current = stack.pop()
        family.append(current)
        for user in current.users:
            if _is_view(user, gm) and user not in seen:
                seen.add(user)
                stack.append(user)
    return [n for n in family if n is not node]


def _check_inplace_aliases(site: SiteMatch, order: Dict[fx.Node, int], gm: fx.GraphModule) -> None:
    position = order[site.node]
    for alias in _alias_family(site.input, gm):
        late = [user.name for user in alias.users if order.get(user, -1) > position]
        if late:
            raise InplaceAliasError(
                f"In-place ReLU '{site.node.name}' mutates '{site.input.name}', which shares memory "
                f"with '{alias.name}', and {late} read '{alias.name}' afterwards. excitation computes "
                f"ReLU out of place (its backward needs the pre-activation), so those reads would "
                f"change. Fix: make that ReLU out-of-place (inplace=False / relu instead of relu_)."
            )


def _resolve_temps(
    matches: List[SiteMatch], gm: fx.GraphModule, rules: Dict[str, Optional[float]], gate: str, temps: TempsSpec,
    pool_backward: str = "soft",
) -> List[Site]:
    sites = []
    for match in matches:
        sites.append(
            Site(
                name=site_name(gm, match.node),
                node=match.node.meta.get(SITE_NODE_META, match.node.name),
                kind=match.kind,
                form=match.form,
                temp=rules[match.rule],
                gate=gate if match.kind == "relu" else None,
                inplace=match.inplace,
                rule=match.rule,
                pool_backward=pool_backward if match.rule == "max_pool" else None,
            )
        )
    if temps is None:
        return sites
    if callable(temps):
        resolved = []
        for site in sites:
            chosen = temps(site) if site.temp is not None else None
            if chosen is not None:
                site = replace(site, temp=check_temp(chosen, argument=f"temps({site.name!r})"))
            resolved.append(site)
        return resolved
    if not isinstance(temps, Mapping):
        raise TypeError(
            f"temps must be a mapping {{site name: temp}}, a callable(site) -> temp, or None; "
            f"got {type(temps).__name__}."
        )
    known = {s.name for s in sites if s.temp is not None} | {s.node for s in sites if s.temp is not None}
    unknown = [key for key in temps if key not in known]
    if unknown:
        raise ValueError(
            f"temps names sites that do not exist: {with_suggestions(unknown, known)}. Valid names are module paths "
            f"or node names of sites with a temperature; see excitation.report(excite(model)).sites."
        )
    checked = {key: check_temp(value, argument=f"temps[{key!r}]") for key, value in temps.items()}
    # A node name is more specific than a module path (a reused module has one path, many nodes).
    return [
        site if site.temp is None else replace(site, temp=checked.get(site.node, checked.get(site.name, site.temp)))
        for site in sites
    ]


def _rewrite_module(gm: fx.GraphModule, match: SiteMatch, site: Site) -> fx.Node:
    """Module-level rules: re-class the (cloned) module; the graph keeps calling it."""
    module = gm.get_submodule(match.node.target)
    if match.kind == "multihead_attention" and type(module) is not ExcitedMultiheadAttention:
        module.__class__ = ExcitedMultiheadAttention  # our clone only; the user's module keeps its class
    match.node.meta[SITE_NAME_META] = site.name
    match.node.meta[SITE_NODE_META] = site.node
    return match.node


def _surrogate_node(graph: fx.Graph, match: SiteMatch, site: Site, saved: str) -> fx.Node:
    if match.kind == "relu":
        kwargs = {"temp": site.temp, "gate": site.gate}
        if saved != "exact":  # graphs stay as they were unless asked
            kwargs["saved"] = saved
        return graph.call_function(surrogate_relu, (match.input,), kwargs)
    if match.kind == "max_pool2d":
        kernel, stride, padding, dilation, ceil_mode = match.pool_args
        kwargs = {"temp": site.temp}
        if site.pool_backward != "soft":  # graphs stay as they were unless asked
            kwargs["pool_backward"] = site.pool_backward
        return graph.call_function(
            surrogate_max_pool2d, (match.input, kernel, stride, padding, dilation, ceil_mode, match.returns_tuple), kwargs
        )
    target, kwargs = surrogate_call(match, site.temp, site.pool_backward or "soft")
    if match.kind == "attention_function":
        return graph.call_function(target, match.node.args, match.node.kwargs)
    for key in ("weight", "bias"):
        if match.kind in ("layer_norm", "rms_norm", "prelu") and match.form == "module" and isinstance(kwargs.get(key), str):
            with graph.inserting_before(match.node):  # defined before the surrogate that reads it
                kwargs[key] = graph.get_attr(kwargs[key])
    return graph.call_function(target, (match.input,), kwargs)


def _rewrite_site(
    gm: fx.GraphModule, match: SiteMatch, site: Site, order: Dict[fx.Node, int], saved: str
) -> fx.Node:
    if match.kind == "multihead_attention":
        return _rewrite_module(gm, match, site)
    graph, node = gm.graph, match.node
    if match.params.get("fused"):
        # Re-exciting a fused site: rebuild bn(x) [+ residual] and rewrite it as an unfused ReLU site
        # (the fusion step after the rewrite fuses it again, with the new temperature, if asked).
        match = replace(match, input=unfuse(graph, node), params={})
    with graph.inserting_after(node):
        new = _surrogate_node(graph, match, site, saved)
    new.meta = dict(node.meta)
    new.meta[SITE_NAME_META] = site.name
    new.meta[SITE_NODE_META] = site.node
    node.replace_all_uses_with(new)
    if match.inplace and isinstance(match.input, fx.Node):
        # The original overwrote its input: later readers of that tensor saw relu(z).
        position = order[node]
        for user in list(match.input.users):
            if user is not new and order.get(user, -1) > position:
                user.replace_input_with(match.input, new)
    module = node.args[1] if node.target is batch_norm_relu else None
    graph.erase_node(node)
    for dead in match.absorbed:  # in use order: hard_mish's 0.5 * x and clamp, then the clamp's add
        if not dead.users:
            graph.erase_node(dead)
    if isinstance(module, fx.Node) and not module.users:
        graph.erase_node(module)  # the fused site's get_attr of its BatchNorm
    return new


def excite_graph(
    gm: fx.GraphModule,
    *,
    options: Optional[Options] = None,
    preset: Optional[str] = None,
    temp: Optional[float] = None,
    pool_temp: Optional[float] = None,
    gate: Optional[str] = None,
    pool_backward: Optional[str] = None,
    temps: TempsSpec = None,
    rules: RulesSpec = None,
    saved: str = "exact",
    fuse: bool = True,
) -> Report:
    """Rewrite every site of the selected rules in ``gm`` in place; return the :class:`Report`.

    Options as for :func:`excite`.  All checks run before the first edit, so a failure
    leaves ``gm`` as it was.

    Parameters
    ----------
    gm : torch.fx.GraphModule
        The graph to rewrite, in place (torch-level or ATen).
    options, preset, temp, pool_temp, gate, pool_backward, temps, rules, saved, fuse
        As for :func:`excite`.

    Returns
    -------
    Report
        What was rewritten and what was left alone.

    Raises
    ------
    ValueError
        Bad options; ``gm`` is then unchanged.
    excitation.InplaceAliasError
        An in-place ReLU mutates a tensor whose views are read later.

    Examples
    --------
    >>> import torch, excitation
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> gm = torch.fx.symbolic_trace(net)
    >>> excitation.excite_graph(gm).counts()
    {'relu': 1, 'max_pool2d': 0}
    """
    options = options_from(options, preset=preset, temp=temp, pool_temp=pool_temp, gate=gate,
                           pool_backward=pool_backward, temps=temps, rules=rules, saved=saved, fuse=fuse)
    gate, pool_backward, saved, active = options.gate, options.pool_backward, options.saved, options.active_rules
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    matches, unhandled, smooth = [], [], []
    for node in graph.nodes:
        match = match_site(gm, node)
        if match is not None:
            if match.rule in active:
                matches.append(match)
            elif match.form != "excited":
                unhandled.append(Unhandled(site_name(gm, node), match.kind, "rule off"))
            continue
        found = match_unhandled(gm, node)
        if found is not None:
            op, reason = found
            (smooth if reason == "smooth" else unhandled).append(Unhandled(site_name(gm, node), op, reason))
    sites = _resolve_temps(matches, gm, active, gate, options.temps_spec, pool_backward)
    for match in matches:
        if match.inplace and isinstance(match.input, fx.Node):
            _check_inplace_aliases(match, order, gm)
    for match, site in zip(matches, sites):
        # Re-match: rewriting earlier sites replaced this node's inputs.
        new = _rewrite_site(gm, match_site(gm, match.node), site, order, saved)
        order[new] = order[match.node]
    if options.fuse:
        fused = fuse_batch_norm_relu(gm)
        sites = [replace(site, fused=fused.get(site.node)) for site in sites]
    graph.lint()
    gm.recompile()
    decomposed = [u.op for u in unhandled if u.reason == "decomposed"]
    if decomposed:
        warnings.warn(
            f"This graph is decomposed (core ATen, e.g. after run_decompositions()): {len(decomposed)} "
            f"activation sites ({', '.join(sorted(set(decomposed)))}) exist only as primitive ops, so their rules "
            f"cannot apply and their backward stays vanilla. Excite before decomposing: excite(model) or "
            f"excite(exported_program), then export / run_decompositions (the excitation ops survive it).",
            UserWarning,
            stacklevel=3,
        )
    return Report(sites=sites, unhandled=unhandled, temp=options.temp, pool_temp=options.pool_temp, gate=gate,
                  rules=active, smooth=smooth, saved=saved, preset=options.preset, pool_backward=pool_backward)


def excite(
    model: Union[nn.Module, "torch.export.ExportedProgram"],
    *,
    options: Optional[Options] = None,
    preset: Optional[str] = None,
    temp: Optional[float] = None,
    pool_temp: Optional[float] = None,
    gate: Optional[str] = None,
    pool_backward: Optional[str] = None,
    temps: TempsSpec = None,
    rules: RulesSpec = None,
    saved: str = "exact",
    fuse: bool = True,
) -> fx.GraphModule:
    """Return a copy of ``model`` whose backward pass yields excitation pullbacks.

    The forward is bit-identical to ``model``'s.  Every ReLU site (``nn.ReLU``,
    ``F.relu``/``F.relu_``, ``torch.relu``/``torch.relu_``, ``.relu()``/``.relu_()``,
    ATen ``relu``/``relu_``) gets the backward ``grad * gate(z / temp)``, and every
    max-pool site (``nn.MaxPool1d/2d/3d``, adaptive max-pools, their functional,
    ``torch`` and ATen forms) the gradient of soft pooling at ``pool_temp``.  The
    other rules (ReLU6/Hardtanh, LeakyReLU, eval-mode RReLU, Threshold, PReLU, ELU/CELU/SELU, SiLU,
    Mish, GELU, Hardswish, timm's hard_mish, Hardsigmoid, LayerNorm, attention) are listed in
    :data:`excitation.RULES`; all apply by default.

    Parameters
    ----------
    model : nn.Module, torch.fx.GraphModule or torch.export.ExportedProgram
        A plain module is traced with ``torch.fx.symbolic_trace``; a GraphModule
        (custom tracer, ``ep.module()``, an excited model) is rewritten as it is.
        An ExportedProgram is rewritten through ``ep.module()``.
    options : excitation.Options, optional
        Every choice below in one object (``Options.build(...)``); give it or the keywords, not both.
    preset : {"paper", "semantic"}, optional
        The rule set the options below start from (:data:`excitation.PRESETS`):
        ``"paper"`` (default: sigmoid gate at 0.3, soft-pool gradient at ``temp``) or
        ``"semantic"`` (the author's later rules: ``Phi(z / 0.6)``, pool softmax
        weights held constant at 0.3).  Explicit arguments override it.
    temp : float, optional
        ReLU gate temperature, > 0 (the preset's: 0.3 or 0.6).  ``temp -> 0`` gives the vanilla gradient.
    pool_temp : float, optional
        Soft-pool temperature; defaults to ``temp`` without a preset, else to the preset's (0.3).
    gate : {"sigmoid", "normal_cdf"}, optional
        The ReLU gate (the preset's).
    pool_backward : {"soft", "weights"}, optional
        What each max-pool's backward differentiates: the soft pool ``sum_w softmax(x_w / pool_temp) x_w``
        (``"soft"``, the paper's) or the same with its softmax weights held constant (``"weights"``:
        ``dx_w = g * softmax(x / pool_temp)_w``).  The preset's by default.
    temps : mapping or callable, optional
        Per-site temperatures: ``{module path or node name: temp}``, or
        ``callable(site) -> temp | None``.  See :class:`excitation.Site`.
    rules : list of names or mapping, optional
        Which rules apply (default: all of :data:`excitation.RULES`).  A list
        names the rules to apply (``["relu", "max_pool"]`` is the seed paper's
        method); a mapping starts from all rules and switches some off or
        re-tempers them: ``{"layer_norm": False, "silu": 2.0}``.  Sites of rules
        that are off are reported in ``report.unhandled`` with reason ``"rule off"``.
    saved : {"exact", "bfloat16", "uint8"}
        What each ReLU keeps for its backward: its pre-activation (exact), or its
        gate already evaluated in 2 or 1 bytes, which cuts the pullback's memory
        overhead over the vanilla gradient to a half or a quarter at a small error
        (see the documentation's Performance pages).  Sites fused with their BatchNorm
        (``fuse``) are always exact: they keep only what vanilla keeps.
    fuse : bool
        Fuse each ReLU with the ``nn.BatchNorm`` before it (and a residual sum
        between them, as in ResNets) into one op that saves BatchNorm's input and
        recomputes the pre-activation in the backward: the same forward bits and
        the same pullback, with no memory overhead at those sites.  Eval-mode
        BatchNorm only; a call in training mode or with hooks on the BatchNorm
        runs unfused.  ``report(...).sites[i].fused`` names the BatchNorm.

    Returns
    -------
    torch.fx.GraphModule
        New module objects (its own ``training`` flag and hooks) sharing the
        original's parameter and buffer tensors.  ``excitation.report(result)``
        lists what was rewritten.  The original model is not modified.

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module``, a ``GraphModule`` or an ``ExportedProgram``.
    ValueError
        Bad options (``temp``, ``gate``, ``temps``, ``rules``, ``saved``, ``preset``).
    excitation.ExcitationTraceError
        ``torch.fx.symbolic_trace`` cannot trace the model (the message names the submodule and
        line, and the ways out: the ``"excitation"`` compile backend or ``torch.export``).
    excitation.InplaceAliasError
        An in-place ReLU mutates a tensor whose views are read later.

    Examples
    --------
    >>> import torch, excitation
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> excited = excitation.excite(net, temp=0.5)
    >>> excitation.report(excited).counts()
    {'relu': 1, 'max_pool2d': 0}
    >>> x = torch.rand(2, 4)
    >>> bool(torch.equal(excited(x), net(x)))
    True
    """
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"excite() needs an nn.Module, a torch.fx.GraphModule or a torch.export.ExportedProgram, "
            f"got {type(model).__name__}."
        )
    check_not_compiled(model, "excite")
    model = _uncompiled(model)  # an excited model in a compile wrapper: re-excite the excited module
    # Checked before the (possibly slow) trace.
    options = options_from(options, preset=preset, temp=temp, pool_temp=pool_temp, gate=gate,
                           pool_backward=pool_backward, temps=temps, rules=rules, saved=saved, fuse=fuse)
    gm = copy_graph_module(model) if isinstance(model, fx.GraphModule) else trace(clone_module_tree(model))
    result = excite_graph(gm, options=options)
    recompute_cheap_convolutions(gm, enabled=options.saved == "exact")  # gm's modules are our clones
    gm = make_excited(gm, result)
    if not result.sites:
        warnings.warn(
            f"excite() found no site of the rules {list(result.rules)} in {type(model).__name__}; its pullback "
            f"equals the vanilla gradient. {_describe_unhandled(result)}",
            UserWarning,
            stacklevel=2,
        )
    return gm


def _describe_unhandled(result: Report) -> str:
    if not result.unhandled:
        return "It has no other activation sites either."
    return f"Activation sites left alone: {result.unhandled_counts()}."


def _uncompiled(model: Any) -> Any:
    """The module inside a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``), else ``model``."""
    return getattr(model, "_orig_mod", model) if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model


def is_excited(model: Any) -> bool:
    """True if ``model`` came out of :func:`excite` (also once ``torch.compile`` wrapped it).

    Parameters
    ----------
    model : object
        Anything; only excited models (possibly compiled) give ``True``.

    Returns
    -------
    bool

    Raises
    ------
    Nothing.

    Examples
    --------
    >>> import torch, excitation
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> excitation.is_excited(net), excitation.is_excited(excitation.excite(net))
    (False, True)
    """
    model = _uncompiled(model)
    return isinstance(model, fx.GraphModule) and isinstance(getattr(model, REPORT_ATTR, None), Report)


def check_not_compiled(model: Any, function: str) -> None:
    """A clear error for a ``torch.compile`` wrapper of a plain model, which cannot be traced."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) and not is_excited(model):
        fix = (
            "Pass the original (uncompiled) model."
            if function == "gradient"
            else "Excite the original model first and compile the result: torch.compile(excitation.excite(model)); "
            "or pass backend=excitation.backend() to torch.compile."
        )
        raise ExcitationError(
            f"{function}() got a torch.compile'd module (OptimizedModule), which torch.fx cannot trace. {fix}"
        )


def report(model: nn.Module) -> Report:
    """The :class:`Report` of an excited model: every rewritten site and every activation left alone.

    For a dynamo-path module from :func:`excitation.prepare`, the sites of all graphs compiled so far.

    Parameters
    ----------
    model : nn.Module
        A result of :func:`excite` (possibly compiled) or of :func:`excitation.prepare`.

    Returns
    -------
    Report
        ``.sites`` (each rewritten site, its rule and temperature), ``.unhandled``, ``.smooth``;
        ``.counts()`` by kind; ``print(report)`` summarises it.

    Raises
    ------
    excitation.ExcitationError
        ``model`` is not an excited model.

    Examples
    --------
    >>> import torch, excitation
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> print(excitation.report(excitation.excite(net)))  # doctest: +ELLIPSIS
    excitation: rewrote 1 relu, 0 max_pool2d sites ...
    """
    if getattr(model, "excitation_path", None) == "dynamo":
        return model.report()
    found = getattr(_uncompiled(model), REPORT_ATTR, None)
    if not isinstance(found, Report):
        raise ExcitationError(
            f"{type(model).__name__} is not an excited model; call excitation.excite(model) first "
            f"and pass its result to report()."
        )
    return found
