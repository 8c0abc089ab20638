"""Conversation templates and the registry that matches a model to its template."""

from chatserve.conversation.templates import DEFAULT_TEMPLATE, TEMPLATES, Template, TemplateRegistry

__all__ = ["DEFAULT_TEMPLATE", "TEMPLATES", "Template", "TemplateRegistry"]
