"""testing (see DESIGN.md)."""
