"""``kvpress-ext list`` and ``kvpress-ext describe NAME``: what the registries hold (presses, adapters, models)."""

from __future__ import annotations


def _cmd_list(args) -> int:
    from kvpress_ext.adapters import available_adapters
    from kvpress_ext.plugins import failed_plugins
    from kvpress_ext.registry import available_presses

    presses = available_presses()
    print(f"Presses ({len(presses)}):")
    for name, info in presses.items():
        params = ", ".join(str(p) for p in info.parameters)
        note = f"  [needs: {info.requires}]" if info.requires else ""
        source = "" if info.source in ("kvpress_ext",) else f"  (from {info.source})"
        print(f"  {name:24s} {info.summary}{source}{note}")
        if params:
            print(f"  {'':24s}   params: {params}")
    print(f"\nModel adapters ({len(available_adapters())}):")
    for adapter in available_adapters():
        print(f"  {adapter.describe()}")
    _list_models()
    failures = failed_plugins()
    if failures:
        print("\nPlugins that failed to load:")
        for f in failures:
            print(f"  {f.name}: {f.reason}")
    return 0


def _list_models() -> None:
    from kvpress_ext.models import DEFAULT_MODEL, available_models, model_status

    models = available_models()
    print(f"\nModels by short name ({len(models)}; --model also takes a local directory or a hub id):")
    for name, info in models.items():
        context = f"{info.context:,}" if info.context else "?"
        default = "  (default)" if name == DEFAULT_MODEL else ""
        plugin = "" if info.plugin == "kvpress_ext" else f"  (from {info.plugin})"
        print(f"  {name:24s} {info.parameters or '?'} parameters, context {context} tokens, {info.licence or '?'}"
              f"{default}{plugin}")
        if info.summary:
            print(f"  {'':24s}   {info.summary}")
        print(f"  {'':24s}   source: {info.source or '?'}")
        status = model_status(info)
        if status:
            print(f"  {'':24s}   status: {status}")


def _cmd_describe(args) -> int:
    from kvpress_ext.registry import press_info

    info = press_info(args.name)
    print(f"{info.name}  ({info.cls.__module__}.{info.cls.__name__}, from {info.source})\n")
    print(info.doc)
    print("\nParameters:")
    for p in info.parameters:
        print(f"  {p.name}: {p.type}" + ("" if p.required else f" = {p.default!r}"))
    if info.defaults:
        print(f"\nDefaults used when built by name without arguments: {info.defaults}")
    if info.requires:
        print(f"\nNeeds: {info.requires}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("list", help="list registered presses, model adapters and model short names")
    p.set_defaults(func=_cmd_list)
    p = subparsers.add_parser("describe", help="print one press's documentation and parameters")
    p.add_argument("name", help="registered press name (see `kvpress-ext list`)")
    p.set_defaults(func=_cmd_describe)
