"""A griffe extension for the documentation build (mkdocs.yml), not part of scgjax.

scgjax's docstrings head their doctest lines `Example:`; griffe's Google parser knows
only `Examples:` as a section and reads `Example:` as an admonition, whose `>>>` lines
Markdown would render as nested block quotes. This reads `Example:` as `Examples:`, so
they render as Python console code.
"""

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
