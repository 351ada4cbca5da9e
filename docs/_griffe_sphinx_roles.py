"""A griffe extension for the docs build: render the Sphinx roles in mlstore's docstrings.

mlstore's docstrings are Google style but use Sphinx roles for cross-references
(``:class:`~mlstore.Store```). mkdocstrings would show those as raw text. This turns
each role into an optional cross-reference: a link when the target is on the site, plain
code otherwise (so an unknown target never breaks ``mkdocs build --strict``). It also
turns a reStructuredText ``::`` at the end of a paragraph into ``:``.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|data|attr|mod|exc|obj|const):`(~?)([^`]+)`")
_LITERAL_MARKER = re.compile(r"(?<=\S)::$", re.MULTILINE)


def _resolve(obj: griffe.Object, name: str) -> str:
    """The full path of ``name`` as written in a docstring of ``obj``."""
    name = name.strip().removesuffix("()")
    scopes = [obj] if obj.is_module or obj.is_class else []
    scopes += [obj.parent, obj.module] if obj.parent is not None else [obj.module]
    for scope in scopes:
        if scope is None:
            continue
        head, _, rest = name.partition(".")
        try:
            member = scope.members.get(head)
            if member is None:
                continue
            found: Any = member
            for part in rest.split(".") if rest else []:
                found = found.members[part]
            return str(found.canonical_path if not found.is_alias else found.target_path)
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
    return name


def _rewrite(obj: griffe.Object, text: str) -> str:
    def replace(m: re.Match[str]) -> str:
        short, target = m.group(1) == "~", m.group(2)
        title = target.rsplit(".", 1)[-1] if short else target
        ident = html.escape(_resolve(obj, target), quote=True)
        return f'<autoref identifier="{ident}" optional><code>{html.escape(title)}</code></autoref>'

    return _LITERAL_MARKER.sub(":", _ROLE.sub(replace, text))


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx cross-reference roles once every module is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._walk(pkg, set())

    def _walk(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = _rewrite(obj, obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen)  # type: ignore[arg-type]
