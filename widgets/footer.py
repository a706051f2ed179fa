"""The key footer: Textual's Footer, without the old keys it keeps alive after each rebuild."""

from __future__ import annotations

from textual import widgets


class Footer(widgets.Footer):
    """Textual's Footer; a rebuild also lets go of the keys it replaced.

    Each key binds `compact` to the footer, and Textual drops the bindings of removed keys only when
    `compact` changes: without that nudge every refresh of the bindings keeps a footer's worth of dead
    widgets in memory.
    """

    async def recompose(self) -> None:
        await super().recompose()
        self.mutate_reactive(Footer.compact)
