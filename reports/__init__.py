"""HTML reports rendered from the Jinja templates in templates/."""
