"""Topic templates: a device name <-> an MQTT topic, both ways.

A template is a topic with exactly one ``{device}`` placeholder that fills a whole
level, e.g. ``devices/{device}/up``. Whole levels only, because then the subscription
filter is exact (``devices/+/up``) and matching a received topic back to a device is
unambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass

PLACEHOLDER = "{device}"
_FORBIDDEN = frozenset("/+#\0")


@dataclass(frozen=True, slots=True)
class TopicTemplate:
    """One topic template, checked when built (see :meth:`parse`)."""

    template: str
    levels: tuple[str, ...]
    index: int

    @classmethod
    def parse(cls, template: str) -> TopicTemplate:
        """Check and build a template; raises ``ValueError`` naming the problem."""
        levels = tuple(template.split("/"))
        slots = [i for i, level in enumerate(levels) if level == PLACEHOLDER]
        if len(slots) != 1 or template.count(PLACEHOLDER) != 1:
            raise ValueError(f"needs exactly one {PLACEHOLDER} that fills a whole topic level")
        if any(c in level for level in levels for c in "+#") or template.startswith("$"):
            raise ValueError("must be a plain topic: no wildcards, not a $ topic")
        if any(not level for level in levels):
            raise ValueError("has an empty topic level")
        return cls(template, levels, slots[0])

    @property
    def filter(self) -> str:
        """The subscription filter matching every device: the placeholder becomes ``+``."""
        return "/".join("+" if i == self.index else lv for i, lv in enumerate(self.levels))

    def format(self, device: str) -> str:
        """The topic of ``device``. A name that would change the topic's shape is refused."""
        if not device or any(c in _FORBIDDEN for c in device):
            raise ValueError(f"device name {device!r} cannot be a topic level")
        return self.template.replace(PLACEHOLDER, device)

    def match(self, topic: str) -> str | None:
        """The device a received topic belongs to, or ``None`` if it is not this template's."""
        levels = topic.split("/")
        if len(levels) != len(self.levels):
            return None
        for i, (got, want) in enumerate(zip(levels, self.levels, strict=True)):
            if i != self.index and got != want:
                return None
        return levels[self.index] or None
