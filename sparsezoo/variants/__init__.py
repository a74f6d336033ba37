"""Built-in variants. Every module here registers itself with `@register_variant`; the registry
imports them all on first use, so adding a variant edits no central list."""
