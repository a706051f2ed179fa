"""The open files' editors, one tab each. The tab bar shows once a second file is open, so a single file keeps its
row for code (80x24 is short)."""

from __future__ import annotations

from textual.widgets import TabbedContent, TabPane

from widgets.editor import CodeEditor, EditorPane


class FileTabs(TabbedContent):
    """A TabbedContent of `EditorPane`s; the app keeps what each tab's file is, this widget only shows them."""

    DEFAULT_CSS = """
    FileTabs {
        height: 1fr;
        & > ContentSwitcher { height: 1fr; }
        & TabPane { height: 1fr; padding: 0; }
        &.-single > ContentTabs { display: none; }
        /* one row: the tab in front is bold and underlined instead of having a bar of its own below */
        & > ContentTabs { height: 1; }
        & > ContentTabs Underline { display: none; }
        & > ContentTabs Tab.-active { text-style: bold underline; background: $boost; }
    }
    """

    def on_mount(self) -> None:
        self._show_bar()

    @staticmethod
    def pane(pane_id: str, label: str, text: str, path: str | None) -> TabPane:
        """A tab holding an editor on `text` (highlighted for `path`'s language)."""
        return TabPane(label, EditorPane(text, path=path), id=pane_id)

    def editor(self, pane_id: str) -> CodeEditor:
        """The editor in the tab `pane_id`."""
        return self.get_pane(pane_id).query_one(CodeEditor)

    def set_label(self, pane_id: str, label: str) -> None:
        """Retitle a tab (asked on every keystroke: an unchanged title costs no relayout)."""
        tab = self.get_tab(pane_id)
        if str(tab.label) != label:
            tab.label = label

    async def add(self, pane: TabPane) -> None:
        """Open a tab (after the others) and show it."""
        await self.add_pane(pane)
        self.active = pane.id or ""
        self._show_bar()

    async def close(self, pane_id: str) -> None:
        await self.remove_pane(pane_id)
        self._show_bar()

    def _show_bar(self) -> None:
        self.set_class(self.tab_count < 2, "-single")
