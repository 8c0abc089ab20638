"""Tool calling: the named formats models write calls in (prompting, grammars, parsers)."""
