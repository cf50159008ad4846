"""Study file (YAML) -> validated ``Study``; every error names the file, the key and the fix.

The whole study is validated before any compute and before anything is written to a
store: keys against the variant's config fields, the task's and the dataset's options;
values against their types; and every cell of the grid is built as a config, so an
impossible combination (patch not dividing the image, width not divisible by heads)
is refused up front.  See docs/studies.md for the format.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import registry
from .data.base import check_local_path, get_dataset
from .errors import ConfigError, HarnessError, StudyError, did_you_mean
from .tasks.base import DATA_FIELDS, Budget, get_task

TOP_KEYS = ("name", "question", "task", "data", "model", "sweep", "exclude", "search", "search_trials",
            "repeats", "seeds", "budget", "objectives", "sampler", "pruner", "device", "profiles",
            "report_metrics", "claims", "ratios", "oom_backoff", "notes")
REQUIRED = ("name", "question", "task", "data", "model", "objectives")
SAMPLERS = ("grid", "tpe", "random")
PRUNERS = ("median", "none", "hyperband", "percentile")
DIRECTIONS = ("minimize", "maximize")
MAX_REPEATS = 1000  # seeds a study may ask for with `repeats`
# figures the engine itself measures in every trial (valid objectives for any task)
ENGINE_METRICS = ("params_m", "gflops_fwd", "gflops_attn_fwd", "train_samples_per_s",
                  "infer_samples_per_s", "train_tokens_per_s", "infer_tokens_per_s", "peak_mem_mb",
                  "trial_time_s")
PATH_KEYS = re.compile(r"(path|root|file|dir|weights)$")


@dataclass
class Objective:
    metric: str
    direction: str


@dataclass
class SearchParam:
    key: str
    type: str                    # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None


@dataclass
class Study:
    path: Path
    name: str                    # name in the file
    profile: str | None
    question: str
    task: str
    task_options: dict
    data: str
    data_options: dict
    variant: str
    model_config: dict
    sweep: dict[str, list]
    exclude: list[dict]          # partial cells removed from the grid
    search: dict[str, SearchParam]
    search_trials: int
    seeds: list[int]
    budget: Budget
    objectives: list[Objective]
    sampler: dict
    pruner: dict
    device: str
    resolved: dict               # the whole file after the profile was merged
    family: str = ""
    oom_backoff: bool = False    # halve the task's batch_size after an out-of-memory error
    cell_models: dict = field(default_factory=dict)  # cell id -> its model config (validated)

    @property
    def study_name(self) -> str:
        """Optuna study / MLflow experiment name: one per file and profile."""
        return f"{self.name}-{self.profile}" if self.profile else self.name

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def cells(self) -> list[dict]:
        """Every combination of the sweep values, in file order."""
        keys = list(self.sweep)
        cells = [dict(zip(keys, combo)) for combo in itertools.product(*self.sweep.values())]
        return [c for c in cells
                if not any(all(c[k] == v for k, v in ex.items()) for ex in self.exclude)]

    def grid_points(self) -> list[tuple[str, int]]:
        """(cell id, seed) pairs, each run search_trials times: one pass over every cell per
        seed, so an interrupted study has every cell at its first seed, and the arms a
        report pairs (same seed, neighbouring cells) run minutes, not hours, apart."""
        return [(cell_id(c), s) for s in self.seeds for c in self.cells()]

    def cell_by_id(self) -> dict[str, dict]:
        return {cell_id(c): c for c in self.cells()}

    def fingerprint(self) -> str:
        blob = json.dumps(self.resolved, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cell_id(cell: dict) -> str:
    return ",".join(f"{k}={_short(v)}" for k, v in cell.items()) or "base"


def _short(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    return str(v)


# ------------------------------------------------------------------- loading

def deep_merge(base: dict, over: dict) -> dict:
    """Profile over base: mappings merge, except a section that names another dataset,
    task or variant, which replaces the base's section (its options would not fit)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            if any(n in v and v[n] != out[k].get(n) for n in ("name", "variant")):
                out[k] = copy.deepcopy(v)
            else:
                out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, refusing duplicate keys (a silent override otherwise)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path) -> dict:
    if not path.exists():
        raise StudyError(f"{path}: no such study file")
    if path.suffix not in (".yaml", ".yml"):
        raise StudyError(f"{path}: a study file must be .yaml or .yml")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # safe: no Python objects
    except yaml.YAMLError as e:
        raise StudyError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise StudyError(f"{path}: not a text file") from None
    if not isinstance(data, dict):
        raise StudyError(f"{path}: the top level must be a mapping of keys "
                         f"({', '.join(REQUIRED)}, ...), got {type(data).__name__}")
    return data


def load_study(path: str | Path, profile: str | None = None, *,
               allowed_roots: list[Path] | None = None) -> Study:
    """Read, merge the profile, validate everything; raise StudyError on any problem."""
    path = Path(path)
    raw = read_yaml(path)
    where = str(path)

    def err(key: str, msg: str) -> StudyError:
        return StudyError(f"{where}: {key}: {msg}")

    for k in raw:
        if k not in TOP_KEYS:
            raise err(k, f"unknown key; {did_you_mean(str(k), TOP_KEYS)}")
    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise err("profiles", "must be a mapping of profile name -> overrides")
    if profile is not None:
        if profile not in profiles:
            raise err("profiles", f"no profile {profile!r}; "
                      f"{did_you_mean(profile, profiles) if profiles else 'the file defines none'}")
        over = profiles[profile] or {}
        if not isinstance(over, dict):
            raise err(f"profiles.{profile}", "must be a mapping of overrides")
        for k in over:
            if k not in TOP_KEYS or k == "profiles":
                raise err(f"profiles.{profile}.{k}", f"unknown key; "
                          f"{did_you_mean(str(k), [t for t in TOP_KEYS if t != 'profiles'])}")
        raw = deep_merge(raw, over)
    resolved = {k: v for k, v in raw.items() if k != "profiles"}
    for k in REQUIRED:
        if k not in resolved or resolved[k] in (None, "", [], {}):
            raise err(k, "is required")

    name = resolved["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_\-]{0,63}", name):
        raise err("name", f"{name!r} must be lower-case letters, digits, '_' or '-' "
                  "(it names the Optuna study and the MLflow experiment)")
    if not isinstance(resolved["question"], str):
        raise err("question", "must be a sentence saying what the study answers")

    # --- task, data, model: each a name plus options checked against a dataclass
    task_name, task_opts = _name_and_options(resolved, "task", "options", err)
    data_name, data_opts = _name_and_options(resolved, "data", "options", err)
    model = resolved["model"]
    if not isinstance(model, dict) or "variant" not in model:
        raise err("model", "must be a mapping with `variant` (a registered name) and `config`")
    for k in model:
        if k not in ("variant", "config"):
            raise err(f"model.{k}", f"unknown key; valid: variant, config")
    variant = model["variant"]
    model_cfg = model.get("config") or {}
    if not isinstance(model_cfg, dict):
        raise err("model.config", "must be a mapping of config fields")
    try:
        task_cls = get_task(str(task_name))
    except HarnessError as e:
        raise err("task.name", str(e)) from None
    try:
        data_spec = get_dataset(str(data_name))
    except HarnessError as e:
        raise err("data.name", str(e)) from None
    try:
        spec = registry.get(str(variant))
    except HarnessError as e:
        raise err("model.variant", str(e)) from None

    # --- sweep: the grid; keys: bare model field | task.x | data.x | variant
    sweep = resolved.get("sweep") or {}
    if not isinstance(sweep, dict):
        raise err("sweep", "must be a mapping of key -> list of values")
    model_fields = registry.config_fields(spec.config_cls)
    task_fields = registry.config_fields(task_cls.Options)
    data_fields = registry.config_fields(data_spec.options_cls)

    def target(key: str, section: str) -> tuple[str, str]:
        if key == "variant":
            return "variant", "variant"
        if "." in key:
            scope, sub = key.split(".", 1)
            fields = {"model": model_fields, "task": task_fields, "data": data_fields}.get(scope)
            if fields is None:
                raise err(f"{section}.{key}", "prefix must be model., task. or data.")
            if sub not in fields:
                raise err(f"{section}.{key}", f"unknown {scope} key; {did_you_mean(sub, fields)}")
            return scope, sub
        if key not in model_fields:
            hint = ""
            if key in task_fields:
                hint = f" (a task option: write task.{key})"
            elif key in data_fields:
                hint = f" (a data option: write data.{key})"
            raise err(f"{section}.{key}", f"not a config field of {spec.config_cls.__name__}"
                      f"{hint}; {did_you_mean(key, model_fields)}")
        return "model", key

    sweep_targets = {}
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise err(f"sweep.{key}", "must be a non-empty list of values, e.g. [2, 4]")
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            raise err(f"sweep.{key}", f"repeats a value in {values}")
        sweep_targets[key] = target(str(key), "sweep")
    if sweep_targets.get("variant"):
        for v in sweep["variant"]:
            try:
                s = registry.get(str(v))
            except HarnessError as e:
                raise err("sweep.variant", str(e)) from None
            if s.family != spec.family:
                raise err("sweep.variant", f"{v!r} is family {s.family!r} but model.variant "
                          f"{variant!r} is {spec.family!r}; sweep variants of one family")

    # --- exclude: partial cells dropped from the grid (e.g. drop rate 0 under every distribution)
    exclude = resolved.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(e, dict) and e for e in exclude):
        raise err("exclude", "must be a list of partial cells, e.g. [{token_drop: beta, drop_rate: 0.0}]")
    for i, ex in enumerate(exclude):
        for k, v in ex.items():
            if k not in sweep:
                raise err(f"exclude[{i}].{k}", f"not a sweep axis; valid: {list(sweep)}")
            if v not in sweep[k]:
                raise err(f"exclude[{i}].{k}", f"{v!r} is not one of the swept values {sweep[k]}")

    # --- search: tuned hyper-parameters inside each cell
    search_raw = resolved.get("search") or {}
    if not isinstance(search_raw, dict):
        raise err("search", "must be a mapping of key -> {type, low, high, ...}")
    search = {}
    for key, sp in search_raw.items():
        scope_sub = target(str(key), "search")
        if key in sweep:
            raise err(f"search.{key}", "is also swept; a key is either swept or searched")
        search[key] = _search_param(key, sp, err)
        del scope_sub
    search_trials = resolved.get("search_trials", 8 if search else 1)
    if not isinstance(search_trials, int) or isinstance(search_trials, bool) or search_trials < 1:
        raise err("search_trials", f"must be an integer >= 1, got {search_trials!r}")
    if search_trials > 1 and not search:
        raise err("search_trials", "is > 1 but there is no `search` block to tune")

    # --- seeds
    if "seeds" in resolved and "repeats" in resolved and profile is None:
        raise err("seeds", "give either `repeats` or `seeds`, not both")
    if "seeds" in resolved:
        seeds = resolved["seeds"]
        if (not isinstance(seeds, list) or not seeds or
                not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
            raise err("seeds", f"must be a non-empty list of integers >= 0, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise err("seeds", f"repeats a seed in {seeds}")
    else:
        repeats = resolved.get("repeats", 1)
        if not isinstance(repeats, int) or isinstance(repeats, bool) or not 1 <= repeats <= MAX_REPEATS:
            raise err("repeats", f"must be an integer in [1, {MAX_REPEATS}], got {repeats!r}")
        seeds = list(range(repeats))

    # --- budget
    budget_raw = resolved.get("budget") or {}
    if not isinstance(budget_raw, dict):
        raise err("budget", "must be a mapping, e.g. {steps: 200}")
    try:
        budget = registry.make_config(Budget, budget_raw, where="budget")
    except HarnessError as e:
        raise err("budget", str(e)) from None

    # --- objectives
    objs_raw = resolved["objectives"]
    if isinstance(objs_raw, dict):
        objs_raw = [objs_raw]
    if not isinstance(objs_raw, list):
        raise err("objectives", "must be a list of {metric, direction}")
    known = list(task_cls.metrics) + list(ENGINE_METRICS) + list(getattr(spec.config_cls, "METRICS", ()))
    objectives = []
    for i, o in enumerate(objs_raw):
        if not isinstance(o, dict) or set(o) - {"metric", "direction"} or "metric" not in o:
            raise err(f"objectives[{i}]", "must be {metric: NAME, direction: minimize|maximize}")
        metric, direction = str(o["metric"]), o.get("direction", "maximize")
        import fnmatch
        if metric not in known and not any(fnmatch.fnmatchcase(metric, p)
                                           for p in task_cls.metric_patterns):
            raise err(f"objectives[{i}].metric", f"task {task_name!r} does not produce {metric!r}; "
                      f"{did_you_mean(metric, known)}")
        if direction not in DIRECTIONS:
            raise err(f"objectives[{i}].direction", f"{direction!r}; valid: minimize, maximize")
        objectives.append(Objective(metric, direction))
    if len({o.metric for o in objectives}) != len(objectives):
        raise err("objectives", "names a metric twice")

    # --- what the report shows besides the objectives, and the papers' claims it checks
    import fnmatch as _fn

    def known_metric(m: str) -> bool:
        return m in known or any(_fn.fnmatchcase(m, p) for p in task_cls.metric_patterns)

    report_metrics = resolved.get("report_metrics") or []
    if not isinstance(report_metrics, list) or not all(isinstance(m, str) for m in report_metrics):
        raise err("report_metrics", "must be a list of metric names")
    for m in report_metrics:
        if not known_metric(m):
            raise err("report_metrics", f"task {task_name!r} does not produce {m!r}; "
                      f"{did_you_mean(m, known)}")
    claims = resolved.get("claims") or []
    if not isinstance(claims, list):
        raise err("claims", "must be a list of {text, axis, metric, best?, worst?, direction?}")
    for i, c in enumerate(claims):
        if not isinstance(c, dict) or "text" not in c:
            raise err(f"claims[{i}]", "must be a mapping with at least `text`")
        extra_keys = set(c) - {"text", "axis", "metric", "best", "worst", "direction", "where"}
        if extra_keys:
            raise err(f"claims[{i}]", f"unknown keys {sorted(extra_keys)}; valid: text, axis, "
                      "metric, best, worst, direction, where")
        for wk, wv in (c.get("where") or {}).items():  # judge the claim on these values only
            if wk not in sweep or not isinstance(wv, list) or any(v not in sweep[wk] for v in wv):
                raise err(f"claims[{i}].where.{wk}", f"must be a sweep axis with a list of its "
                          f"values; axes: {list(sweep)}")
        axis = c.get("axis", next(iter(sweep), None))
        if axis not in sweep:
            raise err(f"claims[{i}].axis", f"{axis!r} is not a sweep axis; valid: {list(sweep)}")
        if "metric" in c and not known_metric(str(c["metric"])):
            raise err(f"claims[{i}].metric", f"{c['metric']!r} is not produced; {did_you_mean(str(c['metric']), known)}")
        for role in ("best", "worst"):
            if role in c and c[role] not in sweep[axis]:
                raise err(f"claims[{i}].{role}", f"{c[role]!r} is not a value of axis {axis}: {sweep[axis]}")
        if c.get("direction", "minimize") not in DIRECTIONS:
            raise err(f"claims[{i}].direction", f"valid: {', '.join(DIRECTIONS)}")

    ratios = resolved.get("ratios") or []
    ratio_keys = {"text", "axis", "metric", "value", "baseline", "ideal", "target", "paired"}
    if not isinstance(ratios, list):
        raise err("ratios", "must be a list of {text, axis, metric, value, baseline, ideal?, target?, "
                  "paired?}")
    for i, r in enumerate(ratios):
        if not isinstance(r, dict) or not {"text", "axis", "metric", "value", "baseline"} <= set(r):
            raise err(f"ratios[{i}]", "must be a mapping with text, axis, metric, value, baseline "
                      "(and optionally ideal, target)")
        if set(r) - ratio_keys:
            raise err(f"ratios[{i}]", f"unknown keys {sorted(set(r) - ratio_keys)}; valid: "
                      f"{', '.join(sorted(ratio_keys))}")
        if r["axis"] not in sweep:
            raise err(f"ratios[{i}].axis", f"{r['axis']!r} is not a sweep axis; valid: {list(sweep)}")
        for role in ("value", "baseline"):
            if r[role] not in sweep[r["axis"]]:
                raise err(f"ratios[{i}].{role}", f"{r[role]!r} is not a value of axis "
                          f"{r['axis']}: {sweep[r['axis']]}")
        for role in ("metric", "ideal", "paired"):
            if role in r and not known_metric(str(r[role])):
                raise err(f"ratios[{i}].{role}", f"{r[role]!r} is not produced; "
                          f"{did_you_mean(str(r[role]), known)}")
        t = r.get("target")
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t):
            raise err(f"ratios[{i}].target", f"must be a number > 0 (a fraction of the ideal, or "
                      f"the ratio itself when there is no ideal), got {t!r}")

    # --- sampler, pruner, device
    sampler = resolved.get("sampler") or {"name": "tpe" if search else "grid"}
    if isinstance(sampler, str):
        sampler = {"name": sampler}
    if not isinstance(sampler, dict) or sampler.get("name") not in SAMPLERS:
        raise err("sampler.name", f"{sampler!r}; valid: {', '.join(SAMPLERS)}")
    if sampler["name"] == "grid" and search:
        raise err("sampler.name", "grid cannot tune `search`; use tpe or random")
    pruner = resolved.get("pruner") or {"name": "median"}
    if isinstance(pruner, str):
        pruner = {"name": pruner}
    if not isinstance(pruner, dict) or pruner.get("name") not in PRUNERS:
        raise err("pruner.name", f"{pruner!r}; valid: {', '.join(PRUNERS)}")
    _check_pruner_args(pruner, err)
    oom_backoff = resolved.get("oom_backoff", False)
    if not isinstance(oom_backoff, bool):
        raise err("oom_backoff", f"must be true or false, got {oom_backoff!r}")
    device = resolved.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise err("device", f"{device!r}; valid: auto, cpu, cuda")

    study = Study(path=path, name=name, profile=profile, question=resolved["question"].strip(),
                  task=task_name, task_options=task_opts, data=data_name, data_options=data_opts,
                  variant=variant, model_config=model_cfg, sweep=sweep, exclude=exclude, search=search,
                  search_trials=search_trials, seeds=seeds, budget=budget, objectives=objectives,
                  sampler=sampler, pruner=pruner, device=device, resolved=resolved,
                  family=spec.family, oom_backoff=oom_backoff)

    if not study.cells():
        raise err("exclude", "removes every cell of the grid")
    # --- every cell must build (types, combinations), before any compute
    roots = allowed_roots if allowed_roots is not None else default_roots()
    infos: dict[str, dict] = {}
    for cell in study.cells():
        cid = cell_id(cell)
        try:
            study.cell_models[cid] = resolve_trial(
                study, cell, seed=study.seeds[0], search_values=None, check_paths=roots,
                data_info_cache=infos).model_cfg
        except HarnessError as e:
            raise StudyError(f"{where}: cell {cid}: {e}") from None
    for i, r in enumerate(ratios):  # after the cells: a bad reference config is named as such
        if "paired" in r:
            check_paired_ratio(r, i, study, err)
    return study


def check_paired_ratio(r: dict, i: int, study: Study, err) -> None:
    """A ratio's ``paired`` metric is the value arm's own in-trial ratio against a model the
    task builds beside it (``Task.related_models``), so one of those must be the baseline arm:
    the axis (a model field) set to ``baseline``.  (The cells, checked before, hold valid
    task options.)"""
    field_name = r["axis"][6:] if r["axis"].startswith("model.") else r["axis"]
    task_cls = get_task(study.task)
    related = task_cls().related_models(make_task_options(study, dict(study.task_options)))
    if not any(field_name in over and over[field_name] == r["baseline"] for over in related.values()):
        raise err(f"ratios[{i}].paired", f"{r['paired']!r} is a ratio against a model the task times "
                  f"beside each trial's, so that model must be the baseline arm, {field_name}="
                  f"{r['baseline']!r} (task benchmark: task.options.reference: {{{field_name}: "
                  f"{r['baseline']}}}); task {task_cls.name!r} builds {related or 'no such model'}")


def default_roots() -> list[Path]:
    """Folders that paths in study files may point into: the project and the runs folder."""
    roots = [Path.cwd().resolve()]
    runs = os.environ.get("HARNESS_RUNS_DIR")
    if runs:
        roots.append(Path(runs).resolve())
    return roots


def _name_and_options(resolved: dict, key: str, opt_key: str, err) -> tuple[str, dict]:
    section = resolved[key]
    if isinstance(section, str):
        return section, {}
    if not isinstance(section, dict) or "name" not in section:
        raise err(key, f"must be a name or a mapping {{name: ..., {opt_key}: {{...}}}}")
    for k in section:
        if k not in ("name", opt_key):
            raise err(f"{key}.{k}", f"unknown key; valid: name, {opt_key}")
    opts = section.get(opt_key) or {}
    if not isinstance(opts, dict):
        raise err(f"{key}.{opt_key}", "must be a mapping")
    return section["name"], opts


def _search_param(key: str, sp: Any, err) -> SearchParam:
    if not isinstance(sp, dict) or "type" not in sp:
        raise err(f"search.{key}", "must be {type: float|int|categorical, low, high, log?} "
                  "or {type: categorical, choices: [...]}")
    t = sp["type"]
    allowed = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
               "categorical": {"type", "choices"}}
    if t not in allowed:
        raise err(f"search.{key}.type", f"{t!r}; valid: float, int, categorical")
    extra = set(sp) - allowed[t]
    if extra:
        raise err(f"search.{key}", f"unknown keys {sorted(extra)} for type {t}; valid: {sorted(allowed[t])}")
    if t == "categorical":
        ch = sp.get("choices")
        if not isinstance(ch, list) or not ch:
            raise err(f"search.{key}.choices", "must be a non-empty list")
        return SearchParam(key, t, choices=ch)
    lo, hi = sp.get("low"), sp.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
        raise err(f"search.{key}", f"low and high must be numbers, got low={lo!r} high={hi!r}")
    if not lo < hi:
        raise err(f"search.{key}", f"low ({lo}) must be < high ({hi})")
    log = bool(sp.get("log", False))
    if log and lo <= 0:
        raise err(f"search.{key}", f"log scale needs low > 0, got {lo}")
    if t == "int" and not (float(lo).is_integer() and float(hi).is_integer()):
        raise err(f"search.{key}", "int search needs integer low/high")
    return SearchParam(key, t, low=lo, high=hi, log=log, step=sp.get("step"))


def _check_pruner_args(pruner: dict, err) -> None:
    import inspect

    import optuna
    cls = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
           "percentile": optuna.pruners.PercentilePruner, "none": optuna.pruners.NopPruner}[pruner["name"]]
    params = set(inspect.signature(cls).parameters)
    for k in pruner:
        if k != "name" and k not in params:
            raise err(f"pruner.{k}", f"not an argument of {cls.__name__}; valid: {sorted(params)}")


# ------------------------------------------------------------ trial resolution

@dataclass
class ResolvedTrial:
    variant: str
    model_overrides: dict        # given to registry.build (after data-implied fields)
    model_cfg: Any
    task_options: Any
    data_options: Any
    seed: int
    cell: dict
    cell_id: str

    def flat_params(self) -> dict:
        """The whole resolved config as flat keys (MLflow params)."""
        out = {"variant": self.variant, "seed": self.seed, "cell": self.cell_id}
        out.update({f"model.{k}": v for k, v in registry.config_dict(self.model_cfg).items()})
        out.update({f"task.{k}": v for k, v in _asdict(self.task_options).items()})
        out.update({f"data.{k}": v for k, v in _asdict(self.data_options).items()})
        return out


def _asdict(obj) -> dict:
    import dataclasses
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else {}


def resolve_trial(study: Study, cell: dict, seed: int, search_values: dict | None = None, *,
                  check_paths: list[Path] | None = None,
                  data_info_cache: dict | None = None) -> ResolvedTrial:
    """Cell + seed (+ searched values) -> typed configs, validated (no compute)."""
    variant = study.variant
    model_over = dict(study.model_config)
    task_over = dict(study.task_options)
    data_over = dict(study.data_options)
    values = {**cell, **(search_values or {})}
    for key, v in values.items():
        if key == "variant":
            variant = v
        elif key.startswith("task."):
            task_over[key[5:]] = v
        elif key.startswith("data."):
            data_over[key[5:]] = v
        else:
            model_over[key[6:] if key.startswith("model.") else key] = v
    task_cls = get_task(study.task)
    data_spec = get_dataset(study.data)
    task_opts = make_task_options(study, task_over)
    data_opts = registry.make_config(data_spec.options_cls, data_over, where="data.options")
    if check_paths is not None:
        check_option_paths(task_opts, "task.options", check_paths)
        check_option_paths(data_opts, "data.options", check_paths)
    info = data_info(study.data, data_opts, data_info_cache)
    spec = registry.get(variant)
    fields = set(registry.config_fields(spec.config_cls))
    task = task_cls()
    implied = task.model_overrides(task_opts, info, fields)
    for k, v in implied.items():
        if k in model_over and model_over[k] != v:
            raise ConfigError(f"model.config.{k}={model_over[k]!r} but the data gives {k}={v!r}; "
                              f"remove {k} from the model config (it follows the data)")
    model_over = {**implied, **model_over}
    model_cfg = spec.config(**model_over)
    for option, extra in task.related_models(task_opts).items():
        follows = sorted(set(extra) & (set(implied) | set(DATA_FIELDS)))
        if follows:
            raise ConfigError(f"task.options.{option}: {follows} set the input (the models "
                              f"share one input); override other fields of {spec.config_cls.__name__}")
        try:
            spec.config(**{**model_over, **extra})
        except HarnessError as e:
            raise ConfigError(f"task.options.{option}: {e}") from None
    return ResolvedTrial(variant, model_over, model_cfg, task_opts, data_opts, seed, cell,
                         cell_id(cell))


def make_task_options(study: Study, task_over: dict) -> Any:
    """The task's typed options from the study's plus a cell's overrides (validated)."""
    return registry.make_config(get_task(study.task).Options, task_over, where="task.options")


def cell_task_options(study: Study, cell: dict) -> Any:
    """A cell's task options alone (no data, no model): the study's, with the cell's task.* keys."""
    over = {**study.task_options, **{k[5:]: v for k, v in cell.items() if k.startswith("task.")}}
    return make_task_options(study, over)


def data_info(name: str, options: Any, cache: dict | None = None) -> dict:
    """The dataset's info (built once per option set and process)."""
    from .data.base import build_dataset
    key = f"{name}:{json.dumps(_asdict(options), sort_keys=True, default=str)}"
    cache = _DATA_CACHE if cache is None else cache
    if key not in cache:
        cache[key] = build_dataset(name, options).info
    return cache[key]


_DATA_CACHE: dict = {}


def check_option_paths(options: Any, section: str, roots: list[Path]) -> None:
    """Paths in a study file must stay inside the project or the runs folder."""
    for k, v in _asdict(options).items():
        if isinstance(v, str) and v and PATH_KEYS.search(k):
            p = check_local_path(v, f"{section}.{k}", must_exist=False)
            full = (Path.cwd() / p).resolve() if not p.is_absolute() else p.resolve()
            if not any(full == r or r in full.parents for r in roots):
                raise ConfigError(f"{section}.{k}={v!r} resolves to {full}, outside the "
                                  f"project and runs folders ({', '.join(map(str, roots))}); "
                                  "put or link the data inside the project")
