"""The key footer: Textual's Footer, showing the keys that matter now within its width."""

from __future__ import annotations

from rich.cells import cell_len
from textual import widgets
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets._footer import FooterKey

OWN_KEYS_AFTER = 2  # the focused widget's keys come after this many of the most important ones


class Footer(widgets.Footer):
    """Textual's Footer that shows as many keys as fit in one line, the most important first.

    `first` names binding ids in order of importance; the focused widget's own keys come after the first two of
    them, and keys that are disabled now, or not named, after all of them.
    What does not fit is on the help screen. A rebuild also lets go of the keys it replaced: each key binds
    `compact` to the footer, and Textual drops the bindings of removed keys only when `compact` changes, so
    without that nudge every refresh of the bindings keeps a footer's worth of dead widgets in memory.
    """

    def __init__(self, first: tuple[str, ...] = (), *, id: str | None = None) -> None:
        super().__init__(compact=True, show_command_palette=False, id=id)
        self._first = first
        self._laid_out_width = 0

    def shown_keys(self, width: int) -> list[Binding]:
        """The bindings shown in `width` cells, in the order they are shown."""
        focused = self.screen.focused
        candidates: dict[str, tuple[Binding, bool, bool]] = {}  # action -> binding, enabled, the focused widget's
        for node, binding, enabled, _tooltip in self.screen.active_bindings.values():
            if binding.show and binding.action not in candidates:
                candidates[binding.action] = (binding, enabled, node is focused and node is not self.screen)
        palette = self.screen.active_bindings.get(self.app.COMMAND_PALETTE_BINDING)
        if self.app.ENABLE_COMMAND_PALETTE and palette is not None and palette.binding.action not in candidates:
            candidates[palette.binding.action] = (palette.binding, palette.enabled, False)

        def rank(item: tuple[Binding, bool, bool]) -> float:
            binding, _enabled, own = item
            if binding.id in self._first[:OWN_KEYS_AFTER]:
                return self._first.index(binding.id)
            if own:  # the focused widget's keys come next: they are what it does now
                return OWN_KEYS_AFTER - 0.5
            return self._first.index(binding.id) if binding.id in self._first else len(self._first)

        ordered = sorted(candidates.values(), key=rank)  # stable: the rest keep their order
        room, chosen = width, set()
        for binding, _enabled, _own in sorted(ordered, key=lambda item: not item[1]):
            need = cell_len(self.app.get_key_display(binding)) + 1 + cell_len(binding.description) + 1
            if need <= room:
                chosen.add(id(binding))
                room -= need
        return [binding for binding, _enabled, _own in ordered if id(binding) in chosen]

    def compose(self) -> ComposeResult:
        if not self._bindings_ready:
            return
        self._laid_out_width = width = self.size.width or self.app.size.width
        active = {
            binding.action: (enabled, tooltip) for _, binding, enabled, tooltip in self.screen.active_bindings.values()
        }
        for binding in self.shown_keys(width):
            enabled, tooltip = active.get(binding.action, (True, ""))
            yield FooterKey(
                binding.key,
                self.app.get_key_display(binding),
                binding.description,
                binding.action,
                disabled=not enabled,
                tooltip=tooltip or binding.tooltip,
            ).data_bind(compact=Footer.compact)

    def on_resize(self) -> None:
        if self.size.width != self._laid_out_width and self._bindings_ready:
            self.call_after_refresh(self.recompose)

    async def recompose(self) -> None:
        await super().recompose()
        self.mutate_reactive(Footer.compact)
