"""Product recipes: the decision rules that judge a part, chosen by the PLC or `edge recipe set`.

A line runs several product types; each needs its own thresholds, minimum areas and regions of
interest. Every recipe's rules are resolved once and handed to every inference worker at start, so
a part carries only its recipe number and a switch costs nothing: it applies exactly at the part
boundary (the PLC writes the recipe before the part's trigger), with no reload and no frame lost.
A recipe number the config does not define is never guessed: that part is fail-safed
(RECIPE_UNKNOWN) and the PLC sees the RECIPE_UNKNOWN alarm bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edge.decision import DecisionRules, DecisionSettings
from models.package import ModelPackage

log = structlog.get_logger(__name__)

NO_RECIPES = 0
"""The recipe number of a line without a `recipes:` section (the line's `decision` rules)."""


class RecipeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = ""
    """What the operator calls it (shown on the page and in `edge recipe get`)."""
    decision: DecisionSettings | None = None
    """This product's rules (thresholds, areas, ROI); None: the line's `decision` section."""


class RecipesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    select: Literal["plc", "cli"] = "plc"
    """plc: the PLC's recipe register selects (docs/plc-register-map.md); cli: `edge recipe set`."""
    initial: int | None = Field(default=None, ge=0, le=0xFFFF)
    """Recipe at start until the PLC (or the last `edge recipe set`, kept across restarts)
    says otherwise; None: parts are fail-safed until a recipe is selected."""
    table: dict[int, RecipeSettings] = Field(min_length=1)
    """Recipe number (0..65535, as the PLC writes it) -> rules."""

    @field_validator("table")
    @classmethod
    def _numbers(cls, v: dict[int, RecipeSettings]) -> dict[int, RecipeSettings]:
        bad = [n for n in v if not 0 <= n <= 0xFFFF]
        if bad:
            raise ValueError(f"recipe numbers must be 0..65535 (a PLC UINT); got {bad}")
        return v


def build_rules(
    recipes: RecipesSettings | None, line_decision: DecisionSettings, package: ModelPackage
) -> dict[int, DecisionRules]:
    """Every recipe's rules against this package (ValueError names a bad recipe)."""
    th = package.manifest.thresholds

    def rules(decision: DecisionSettings) -> DecisionRules:
        return DecisionRules(
            decision,
            package.manifest.classes,
            package_thresholds=th.per_class,
            package_default=th.default,
            package_min_area=th.min_area_px,
        )

    if recipes is None:
        return {NO_RECIPES: rules(line_decision)}
    out = {}
    for number, recipe in recipes.table.items():
        try:
            out[number] = rules(recipe.decision or line_decision)
        except ValueError as exc:
            raise ValueError(f"recipes.table.{number}: {exc}") from None
    return out


class RecipeBook:
    """The selected recipe, who selected it, and whether it is one the config defines."""

    def __init__(self, settings: RecipesSettings | None, state_file: Path | None) -> None:
        self.settings = settings
        self._state_file = state_file
        self.current: int | None = NO_RECIPES if settings is None else settings.initial
        self.selected_by = "config"
        if settings is not None and settings.select == "cli":
            saved = self._load()
            if saved is not None:
                self.current, self.selected_by = saved, "edge recipe set (saved)"
        self.changes = 0

    @property
    def plc_selects(self) -> bool:
        return self.settings is not None and self.settings.select == "plc"

    def known(self, number: int | None) -> bool:
        if number is None:
            return False
        return number == NO_RECIPES if self.settings is None else number in self.settings.table

    @property
    def unknown_selected(self) -> bool:
        return self.settings is not None and not self.known(self.current)

    def name(self, number: int | None) -> str:
        if self.settings is None or number is None or number not in self.settings.table:
            return ""
        return self.settings.table[number].name

    def select(self, number: int, by: str) -> None:
        """Make `number` current (it may be unknown: parts are then fail-safed)."""
        if number == self.current:
            return
        log.info(
            "recipe_selected",
            recipe=number,
            name=self.name(number),
            previous=self.current,
            by=by,
            known=self.known(number),
        )
        self.current, self.selected_by = number, by
        self.changes += 1
        if by.startswith("edge recipe set"):
            self._save(number)

    def for_part(self) -> int | None:
        """The recipe a part decided now is judged by (None: unknown, fail-safe it)."""
        return self.current if self.known(self.current) else None

    def describe(self) -> dict[str, object]:
        return {
            "current": self.current,
            "name": self.name(self.current),
            "known": self.known(self.current),
            "selected_by": self.selected_by,
            "select": self.settings.select if self.settings else "none",
            "table": {n: r.name for n, r in (self.settings.table if self.settings else {}).items()},
        }

    def _load(self) -> int | None:
        if self._state_file is None:
            return None
        try:
            value = json.loads(self._state_file.read_text())["recipe"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return value if isinstance(value, int) else None

    def _save(self, number: int) -> None:
        if self._state_file is None:
            return
        try:
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"recipe": number}))
            os.replace(tmp, self._state_file)
        except OSError as exc:
            log.warning("recipe_not_saved", error=str(exc))

