"""Cut a model into a client-side *bottom* and a server-side *top*.

The two halves compose back to the original model: ``top(bottom(x))`` computes
exactly ``model(x)``. Cuts are given either as an integer child index of an
:class:`torch.nn.Sequential` or as a dotted submodule name (``"block11"``,
``"layer2.1"``); the cut is placed right after the named submodule.

Splitting never touches the caller's model: both halves are built from deep
copies and share no parameters, buffers or submodules with it or with each other.
Parameter and buffer names are kept, so the state-dict keys of the halves are the
keys of the original model.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NoReturn

import torch
from torch import fx, nn

from splitflower.errors import SplitError
from splitflower.models import UnknownModelError, residual_blocks

__all__ = [
    "PAPER_CUTS",
    "client_blocks_for_cut",
    "cut_shape",
    "split_for_cut",
    "split_last_layer",
    "split_model",
]

logger = logging.getLogger(__name__)

PAPER_CUTS: Mapping[str, int] = MappingProxyType({"s": 12, "m": 17, "d": 26})
"""Client-side residual blocks of ResNet-110 for the shallow/medium/deep cuts."""

_PAPER_BLOCKS = 54
_RESNET_NAME = re.compile(r"resnet(\d+)")
_LENET_CUTS: Mapping[str, str] = MappingProxyType({"s": "conv1", "m": "conv2"})

# Errors torch.fx raises when a forward cannot be traced symbolically; TraceError
# covers data-dependent control flow, the others come from code that inspects proxies.
_TRACE_ERRORS: tuple[type[Exception], ...] = (
    fx.proxy.TraceError,
    TypeError,
    ValueError,
    RuntimeError,
    AttributeError,
    NotImplementedError,
)


def split_model(model: nn.Module, at: int | str) -> tuple[nn.Module, nn.Module]:
    """Split ``model`` into ``(bottom, top)`` with ``top(bottom(x)) == model(x)``.

    Parameters
    ----------
    model : nn.Module
        The model to cut. It is never modified; both halves are independent deep
        copies (tied weights that end up on different sides are untied).
    at : int or str
        - ``int``: ``model`` must be an :class:`~torch.nn.Sequential`; the bottom
          gets its first ``at`` children and the top the rest (``0 < at < len``).
        - ``str``: dotted path of a submodule; the cut goes right after it.
          Nested plain ``Sequential`` containers are cut structurally; any other
          module is traced with :func:`torch.fx.symbolic_trace` and the graph is
          cut after the last operation of the named submodule, giving
          :class:`torch.fx.GraphModule` halves. Exactly one value may cross the
          cut, so a cut that a skip connection spans is rejected.

    Returns
    -------
    tuple[nn.Module, nn.Module]
        ``(bottom, top)``; their ``training`` flags follow ``model``.

    Raises
    ------
    SplitError
        For an out-of-range index, an integer cut of a non-Sequential model, an
        unknown or empty path, a cut that leaves nothing for the top, a cut that
        more than one value would cross, or a forward torch.fx cannot trace.

    Notes
    -----
    The fx route records the forward as traced: Python control flow and
    ``self.training`` checks written in ``forward`` itself are frozen at split time
    (``torch.nn`` layers such as BatchNorm and Dropout still follow ``train()``).

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> bottom, top = split_model(model, 2)
    >>> x = torch.randn(3, 4)
    >>> torch.equal(top(bottom(x)), model(x))
    True
    """
    if isinstance(at, bool) or not isinstance(at, int | str):
        raise SplitError(f"a cut must be an integer child index or a dotted submodule name, got {at!r}")
    if isinstance(at, int):
        # The containers only refer to the caller's children; the copies below
        # detach them.
        bottom, top = _split_at_index(model, at)
        logger.debug("split %s at child %d", type(model).__name__, at)
        return copy.deepcopy(bottom), copy.deepcopy(top)
    path = at.strip()
    if not path:
        raise SplitError("empty submodule path: name the submodule to cut after, e.g. 'layer2'")
    segments = path.split(".")
    _check_path(model, segments, path)
    # Tracing runs the forward, which may touch module state: work on a copy.
    work = copy.deepcopy(model)
    bottom, maybe_top = _split_at_path(work, segments, path)
    if maybe_top is None:
        raise SplitError(
            f"cutting after {path!r} leaves nothing for the server: it is the last "
            "computation of the model; cut earlier"
        )
    logger.debug("split %s after %r", type(model).__name__, path)
    # The bottom owns `work`; copying the top makes sure a module used on both
    # sides of the cut (e.g. one shared activation) is not shared by the halves.
    return bottom, copy.deepcopy(maybe_top)


def _is_plain_sequential(module: nn.Module) -> bool:
    # A Sequential subclass with its own forward is not a chain of its children.
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    # named_children() drops repeated modules, but Sequential.forward calls every
    # entry, including a module registered twice under different names.
    return [(name, child) for name, child in module.named_modules(remove_duplicate=False) if name and "." not in name]


def _sequential(children: Sequence[tuple[str, nn.Module]], like: nn.Module) -> nn.Sequential:
    seq = nn.Sequential(OrderedDict(children))
    # Only the container's own flag: the children keep whatever mode they are in.
    seq.training = like.training
    return seq


def _split_at_index(model: nn.Module, at: int) -> tuple[nn.Module, nn.Module]:
    if not _is_plain_sequential(model):
        raise SplitError(
            f"an integer cut needs an nn.Sequential model, got {type(model).__name__}; "
            "cut after a named submodule instead (a dotted name such as 'layer2')"
        )
    children = _children(model)
    if len(children) < 2:
        raise SplitError(f"cannot split a Sequential with {len(children)} child(ren): it needs at least 2")
    if not 0 < at < len(children):
        raise SplitError(
            f"integer cut must be in the range 1..{len(children) - 1} "
            f"(the Sequential has {len(children)} children), got {at}"
        )
    return _sequential(children[:at], model), _sequential(children[at:], model)


def _check_path(model: nn.Module, segments: Sequence[str], path: str) -> None:
    current = model
    where = "model"
    for depth, segment in enumerate(segments):
        if not segment:
            raise SplitError(f"malformed submodule path {path!r}: empty segment")
        children = dict(_children(current))
        if segment not in children:
            available = ", ".join(children) or "(none)"
            raise SplitError(f"no submodule {segment!r} in {where!r} (path {path!r}); available: {available}")
        current = children[segment]
        where = ".".join(segments[: depth + 1])


def _split_at_path(module: nn.Module, segments: Sequence[str], full_path: str) -> tuple[nn.Module, nn.Module | None]:
    """Cut ``module`` after ``segments``; the top is ``None`` when nothing follows."""
    if not _is_plain_sequential(module):
        return _split_traced(module, ".".join(segments), full_path)
    children = _children(module)
    names = [name for name, _ in children]
    index = names.index(segments[0])
    name, child = children[index]
    before, after = children[:index], children[index + 1 :]
    if len(segments) == 1:
        bottom_children = [*before, (name, child)]
        top_children = after
    else:
        child_bottom, child_top = _split_at_path(child, segments[1:], full_path)
        bottom_children = [*before, (name, child_bottom)]
        # The halves of the cut child keep its name, so state-dict keys are unchanged.
        top_children = ([(name, child_top)] if child_top is not None else []) + after
    bottom = _sequential(bottom_children, module)
    top = _sequential(top_children, module) if top_children else None
    return bottom, top


def _belongs_to(node: fx.Node, path: str) -> bool:
    prefix = path + "."
    target = node.target
    if node.op == "call_module" and isinstance(target, str):
        return target == path or target.startswith(prefix)
    # nn_module_stack also catches functional ops (e.g. `out + identity`) executed
    # inside the module's forward, which have no module target of their own.
    stack = node.meta.get("nn_module_stack")
    if not isinstance(stack, Mapping):
        return False
    qualnames = [e[0] for e in stack.values() if isinstance(e, tuple) and e]
    return any(isinstance(q, str) and (q == path or q.startswith(prefix)) for q in qualnames)


def _trace(module: nn.Module, full_path: str) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(module)
    except _TRACE_ERRORS as exc:
        raise SplitError(
            f"cannot cut {type(module).__name__} at {full_path!r}: torch.fx could "
            f"not trace its forward ({exc}); forwards with data-dependent control "
            "flow cannot be cut by name, so use an nn.Sequential model or an "
            "integer cut"
        ) from exc


def _crossing(nodes: Sequence[fx.Node], cut: int) -> tuple[list[fx.Node], set[fx.Node]]:
    """Return the values crossing a cut after ``nodes[cut]`` and those to recompute."""
    in_bottom = set(nodes[: cut + 1])
    # Values that do not depend on the inputs (constants, parameter reads) can be
    # recomputed by the top instead of crossing the cut.
    dependent: set[fx.Node] = set()
    for node in nodes:
        inputs = node.all_input_nodes
        if node.op == "placeholder" or any(arg in dependent for arg in inputs):
            dependent.add(node)
    crossing: list[fx.Node] = []
    pending: list[fx.Node] = []
    for node in nodes[cut + 1 :]:
        for arg in node.all_input_nodes:
            if arg in in_bottom and arg in dependent and arg not in crossing:
                crossing.append(arg)
            elif arg in in_bottom and arg not in dependent:
                pending.append(arg)
    recompute: set[fx.Node] = set()
    while pending:
        node = pending.pop()
        if node not in recompute:
            recompute.add(node)
            pending.extend(node.all_input_nodes)
    return crossing, recompute


def _split_traced(module: nn.Module, path: str, full_path: str) -> tuple[nn.Module, nn.Module | None]:
    traced = _trace(module, full_path)
    nodes = list(traced.graph.nodes)
    # Parameter reads are excluded: they can sit anywhere and are cheap to repeat.
    owned = [i for i, node in enumerate(nodes) if node.op != "get_attr" and _belongs_to(node, path)]
    if not owned:
        raise SplitError(
            f"cannot cut after {full_path!r}: torch.fx sees no operation of it in "
            f"the forward of {type(module).__name__} (it is never called, or it "
            "lies inside a module torch.fx does not trace into)"
        )
    cut = owned[-1]
    bottom_nodes, top_nodes = nodes[: cut + 1], nodes[cut + 1 :]
    crossing, recompute = _crossing(nodes, cut)
    if len(crossing) != 1:
        _raise_crossing(crossing, full_path)
    cross = crossing[0]

    bottom_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in bottom_nodes:
        env[node] = bottom_graph.node_copy(node, env.__getitem__)
    bottom_graph.output(env[cross])
    bottom = fx.GraphModule(traced, bottom_graph)
    # Drop what only the top needs (e.g. recomputed parameter reads), then the
    # submodules nothing refers to any more.
    bottom.graph.eliminate_dead_code()
    bottom.graph.lint()
    bottom.delete_all_unused_submodules()
    bottom.recompile()
    bottom.training = module.training

    output = top_nodes[-1]
    if len(top_nodes) == 1 and not recompute and output.args[0] is cross:
        return bottom, None

    top_graph = fx.Graph()
    env = {cross: top_graph.placeholder(cross.name)}
    for node in bottom_nodes:
        if node in recompute:
            env[node] = top_graph.node_copy(node, env.__getitem__)
    for node in top_nodes:
        env[node] = top_graph.node_copy(node, env.__getitem__)
    top_graph.lint()
    top = fx.GraphModule(traced, top_graph)
    top.training = module.training
    return bottom, top


def _raise_crossing(crossing: Sequence[fx.Node], full_path: str) -> NoReturn:
    if not crossing:
        raise SplitError(
            f"cannot cut after {full_path!r}: no value computed before the cut is used "
            "after it, so the server part would ignore the client's output"
        )
    names = ", ".join(node.name for node in crossing)
    parent = full_path.rpartition(".")[0]
    hint = f" such as {parent!r}" if parent else ""
    raise SplitError(
        f"cannot cut after {full_path!r}: {len(crossing)} values would cross the cut "
        f"(crossing values: {names}) but the client can send exactly one tensor; "
        "a skip connection probably spans the cut, so cut at a block boundary"
        f"{hint} instead"
    )


def client_blocks_for_cut(depth: int, cut: str | int) -> int:
    """Return how many residual blocks of a CIFAR ResNet stay on the client.

    The cuts ``"s"``, ``"m"`` and ``"d"`` of the decoupled split-learning paper keep
    12, 17 and 26 of the 54 residual blocks of ResNet-110 on the client. Other
    depths keep the same proportion, ``round(blocks * k / 54)`` (Python rounding,
    ties to even), clamped to ``1..blocks-1``. An integer is taken as the block
    count itself.

    Raises
    ------
    SplitError
        If ``cut`` is not ``"s"``, ``"m"``, ``"d"`` or an integer in ``1..blocks-1``.
    ModelSpecError
        If ``depth`` is not 6n+2.

    Examples
    --------
    >>> client_blocks_for_cut(110, "m"), client_blocks_for_cut(20, "d")
    (17, 4)
    """
    blocks = residual_blocks(depth)
    if isinstance(cut, bool) or not isinstance(cut, int | str):
        raise SplitError(f"cut must be one of s, m, d or an integer, got {cut!r}")
    if isinstance(cut, int):
        if not 1 <= cut <= blocks - 1:
            raise SplitError(
                f"resnet{depth} has {blocks} residual blocks: an integer cut must keep "
                f"1..{blocks - 1} of them on the client, got {cut}"
            )
        return cut
    key = cut.strip().lower()
    if key not in PAPER_CUTS:
        raise SplitError(f"unknown cut {cut!r}; use one of s, m, d or an integer")
    return min(max(round(blocks * PAPER_CUTS[key] / _PAPER_BLOCKS), 1), blocks - 1)


def split_for_cut(model_name: str, model: nn.Module, cut: str | int) -> tuple[nn.Module, nn.Module]:
    """Split a model built by :func:`splitflower.models.build_model` at a named cut.

    - ``resnet<depth>``: the client gets the stem and the first
      :func:`client_blocks_for_cut` residual blocks.
    - ``lenet5``: ``"s"`` cuts after ``conv1`` (LocFedMix-SL), ``"m"`` after
      ``conv2``; an integer is a child index for :func:`split_model`. ``"d"`` is not
      defined because the classifier is a single child.

    Raises
    ------
    UnknownModelError
        If ``model_name`` is neither ``lenet5`` nor ``resnet<depth>``.
    SplitError
        If the cut is invalid for the model or ``model`` does not have the
        structure ``model_name`` implies.

    Examples
    --------
    >>> from splitflower.models import resnet110
    >>> bottom, top = split_for_cut("resnet110", resnet110(), "s")
    >>> len(bottom)  # stem + 12 residual blocks
    13
    """
    name = model_name.strip().lower() if isinstance(model_name, str) else ""
    if name == "lenet5":
        if isinstance(cut, str):
            key = cut.strip().lower()
            if key not in _LENET_CUTS:
                raise SplitError(
                    f"cut {cut!r} is not defined for lenet5; use 's' (after conv1), "
                    "'m' (after conv2) or an integer child index"
                )
            return split_model(model, _LENET_CUTS[key])
        try:
            return split_model(model, cut)
        except SplitError as err:  # split_model checks the index; say it in LeNet-5's terms
            children = len(_children(model))
            if not isinstance(cut, int) or isinstance(cut, bool) or 0 < cut < children:
                raise  # not an index out of range
            raise SplitError(
                f"lenet5 has {children} parts (conv1, conv2, classifier): an integer cut keeps 1..{children - 1} "
                f"of them on the client, got {cut}; or use 's' (after conv1) or 'm' (after conv2)"
            ) from err
    match = _RESNET_NAME.fullmatch(name)
    if match is None:
        raise UnknownModelError(f"cannot split unknown model {model_name!r}; expected 'lenet5' or 'resnet<depth>'")
    depth = int(match.group(1))
    client_blocks = client_blocks_for_cut(depth, cut)
    expected = residual_blocks(depth) + 2
    if not _is_plain_sequential(model) or len(_children(model)) != expected:
        raise SplitError(
            f"model does not look like {name}: expected an nn.Sequential of stem, "
            f"{expected - 2} residual blocks and head ({expected} children)"
        )
    return split_model(model, 1 + client_blocks)


def split_last_layer(top: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Split ``top`` into ``(middle, tail)`` with the tail holding its last layer with
    parameters (e.g. the classifier's final linear layer), for U-shaped split learning,
    where the client keeps both ends of the network: ``tail(middle(x)) == top(x)``.

    Raises
    ------
    SplitError
        If ``top`` has no parameterised layer after its first layer.

    Examples
    --------
    >>> top = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> middle, tail = split_last_layer(top)
    >>> len(middle), tail
    (2, Sequential(
      (2): Linear(in_features=8, out_features=2, bias=True)
    ))
    """
    leaves = [name for name, module in top.named_modules() if name and not next(module.children(), None)]
    weighted = [i for i, name in enumerate(leaves) if next(top.get_submodule(name).parameters(False), None) is not None]
    if not weighted or weighted[-1] == 0:
        raise SplitError(
            f"cannot split a last layer off {type(top).__name__}: it needs a layer with parameters "
            "after its first layer (the server would keep nothing)"
        )
    return split_model(top, leaves[weighted[-1] - 1])


def cut_shape(bottom: nn.Module, input_shape: tuple[int, ...]) -> torch.Size:
    """Return the per-sample shape of the tensor ``bottom`` sends across the cut.

    A zero batch of two samples runs in eval mode under :func:`torch.no_grad`, so
    BatchNorm running statistics are not updated; every submodule's training flag is
    restored afterwards.

    Parameters
    ----------
    bottom : nn.Module
        Client-side half of a split.
    input_shape : tuple[int, ...]
        Shape of one input sample, without the batch dimension (e.g. ``(1, 28, 28)``).

    Raises
    ------
    SplitError
        If ``input_shape`` has a non-positive entry, ``bottom`` fails on such an input
        (e.g. the wrong number of channels) or does not return a single tensor.

    Examples
    --------
    >>> bottom = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.MaxPool2d(2))
    >>> cut_shape(bottom, (1, 28, 28))
    torch.Size([6, 14, 14])
    """
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in input_shape):
        raise SplitError(f"input_shape must hold positive integers, got {input_shape!r}")
    reference: torch.Tensor | None = next(iter(bottom.parameters()), None)
    if reference is None:
        reference = next(iter(bottom.buffers()), None)
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
    device = reference.device if reference is not None else None
    sample = torch.zeros((2, *input_shape), dtype=dtype, device=device)
    modes = [(module, module.training) for module in bottom.modules()]
    try:
        bottom.eval()
        with torch.no_grad():
            out = bottom(sample)
    except (RuntimeError, ValueError, TypeError) as err:
        raise SplitError(
            f"the bottom cannot take inputs of shape {list(input_shape)} (one sample, no batch dimension): {err}"
        ) from err
    finally:
        for module, training in modes:
            module.training = training
    if not isinstance(out, torch.Tensor):
        raise SplitError(f"the bottom must return a single tensor, got {type(out).__name__}")
    return out.shape[1:]
