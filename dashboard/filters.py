"""Sidebar filters mirrored into the URL query parameters, so a view can be shared by its link.

A widget takes its first value from the URL (when the URL names a valid option), then the
user's choice; after the page has drawn, `sync_url` writes the current choices back, so the
address bar always describes what is on screen. Keys in the URL are short (`method`, `k`,
`task`); widget keys are prefixed with the page, so pages never share a widget's state.
"""

from __future__ import annotations

import streamlit as st


class Filters:
    """The filters of one page; `params` is what goes into the URL."""

    def __init__(self, page: str):
        self.page = page
        self.params: dict[str, str | list[str]] = {}

    def _key(self, param: str) -> str:
        return f"{self.page}.{param}"

    def select(self, label: str, param: str, options: list, default=None, format_func=str, help=None):
        """A selectbox; None when there are no options."""
        if not options:
            return None
        key, by_text = self._key(param), {str(o): o for o in options}
        if st.session_state.get(key) not in options:
            from_url = st.query_params.get(param)
            st.session_state[key] = by_text.get(from_url, default if default in options else options[0])
        value = st.sidebar.selectbox(label, options, key=key, format_func=format_func, help=help)
        self.params[param] = str(value)
        return value

    def multi(self, label: str, param: str, options: list, default: list | None = None, help=None) -> list:
        """A multiselect; `default` (all options when None) is what it starts with and is left out of the URL."""
        key, by_text = self._key(param), {str(o): o for o in options}
        if key not in st.session_state:
            from_url = [by_text[v] for v in st.query_params.get_all(param) if v in by_text]
            st.session_state[key] = from_url or list(default if default is not None else options)
        else:
            st.session_state[key] = [v for v in st.session_state[key] if v in options]
        value = st.sidebar.multiselect(label, options, key=key, help=help)
        if set(value) != set(default if default is not None else options):
            self.params[param] = [str(v) for v in value]
        return value

    def slider(self, label: str, param: str, low: int, high: int, default: int, help=None) -> int:
        """An integer slider; its default is left out of the URL."""
        key = self._key(param)
        if key not in st.session_state:
            from_url = st.query_params.get(param, "")
            st.session_state[key] = int(from_url) if from_url.isdigit() and low <= int(from_url) <= high else default
        value = st.sidebar.slider(label, low, high, key=key, help=help)
        if value != default:
            self.params[param] = str(value)
        return value

    def text(self, label: str, param: str, help=None) -> str:
        key = self._key(param)
        if key not in st.session_state:
            st.session_state[key] = st.query_params.get(param, "")
        value = st.sidebar.text_input(label, key=key, help=help)
        if value:
            self.params[param] = value
        return value


def sync_url(page: str, filters: Filters | None) -> None:
    """Make the URL describe the current view: the page and its non-default filters."""
    wanted = {"page": page, **(filters.params if filters else {})}
    current = {key: st.query_params.get_all(key) for key in st.query_params}
    normal = {key: value if isinstance(value, list) else [value] for key, value in wanted.items()}
    if current != normal:
        st.query_params.from_dict(wanted)
