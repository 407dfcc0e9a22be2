"""Check manifests the way the API server and the KubeRay operator would, without a cluster.

cel-python and kubernetes-validate (the dev extras) are imported where they are used: the importer's check of
a manifest's field types needs only jsonschema, which Ray brings.

- Custom resources (ray.io, kueue.x-k8s.io) against the openAPIV3Schema of the CRD version they
  name, read from ../shared/schemas (KubeRay v1.7.0, Kueue v0.19.2): JSON Schema (Draft 7) with
  int-or-string quantities and int32/int64 ranges; unknown fields rejected as strict field
  validation does (the CRDs leave objects open, the API server would prune silently); embedded
  ObjectMeta checked against Kubernetes' own schema; schema defaults applied, then every CEL rule
  (`x-kubernetes-validations`) that does not compare with the old object evaluated with cel-python.
- A few rules the KubeRay operator enforces when it reconciles (label syntax, conflicting resource
  settings, replica bounds, autoscaler v2 restart policy, token auth needing Ray >= 2.52).
- Core objects (Namespace, NetworkPolicy, ConfigMap) with kubernetes-validate --strict, pinned to
  Kubernetes KUBERNETES_VERSION.

Every problem names the object, the path of the offending field and what is wrong.
"""

from __future__ import annotations

import copy
import difflib
import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource

from cluster.spec import MIN_TOKEN_AUTH_RAY, label_key_problem, label_value_problem, ray_version_parts

KUBERNETES_VERSION = "1.35.0"
SCHEMAS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "schemas"
CRD_GROUPS = {"ray.io": "kuberay", "kueue.x-k8s.io": "kueue"}
_OBJECT_META_REF = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
_DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SchemaError(Exception):
    """The CRD schemas cannot be found or read; the message says where they were looked for."""


def format_path(parts: Iterable[Any]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# --- CRD schemas -------------------------------------------------------------------------------


def _plural(kind: str) -> str:
    lower = kind.lower()
    if lower.endswith("y"):
        return lower[:-1] + "ies"
    return lower + ("es" if lower.endswith("s") else "s")


@functools.cache
def _load_crd(path: Path) -> dict[str, Any]:
    with path.open() as handle:
        return yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def crd_schema(group: str, version: str, kind: str, schemas_dir: Path = SCHEMAS_DIR) -> dict[str, Any]:
    """The openAPIV3Schema of `kind` in `group/version`.

    Raises SchemaError when the schemas are missing, KeyError when the group has no such kind or version.
    """
    directory = schemas_dir / CRD_GROUPS[group]
    if not directory.is_dir():
        raise SchemaError(f"no CRD schemas at {directory}; llmos reads them from ../shared/schemas")
    path = directory / f"{group}_{_plural(kind)}.yaml"
    if not path.is_file():
        raise KeyError(f"{group} has no kind {kind!r} (no {path.name} in {directory})")
    crd = _load_crd(path)
    if crd["spec"]["names"]["kind"] != kind:
        raise SchemaError(f"{path} defines {crd['spec']['names']['kind']}, not {kind}")
    versions = {v["name"]: v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]}
    if version not in versions:
        raise KeyError(f"{group}/{version} has no {kind}; served versions: {', '.join(versions)}")
    return versions[version]


def _int_or_string(validator: Any, enabled: bool, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    if enabled and (isinstance(instance, bool) or not isinstance(instance, int | str)):
        yield jsonschema.ValidationError(f"{instance!r} is neither an integer nor a string")


_FORMATS = jsonschema.FormatChecker(formats=())
for _name, (_low, _high) in _INT_RANGES.items():
    _FORMATS.checks(_name)(lambda value, low=_low, high=_high: not isinstance(value, int) or low <= value <= high)

_CrdValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-int-or-string": _int_or_string})


@functools.cache
def _object_meta_validator() -> jsonschema.Draft202012Validator:
    from kubernetes_validate.utils import schema_contents

    definitions = schema_contents(
        f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict/_definitions.json", KUBERNETES_VERSION
    )
    registry = Resource.from_contents(definitions) @ Registry()
    return jsonschema.Draft202012Validator({"$ref": _OBJECT_META_REF}, registry=registry)


# --- the checks --------------------------------------------------------------------------------


def _error_problems(error: jsonschema.ValidationError) -> list[Problem]:
    """A JSON Schema error as problems that point at the offending field itself."""
    path = list(error.absolute_path)
    if error.validator == "required":
        field = re.match(r"^'(.+)' is a required property", error.message)
        return [Problem(format_path([*path, field.group(1) if field else "?"]), "required field is missing")]
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties") or {}
        return [
            Problem(format_path([*path, key]), "unknown field" + _known_hint(key, known))
            for key in error.instance
            if key not in known
        ]
    message = error.message
    if error.validator == "pattern" and error.schema.get("x-kubernetes-int-or-string"):
        message = f"{error.instance!r} is not a Kubernetes quantity; write e.g. 500m, 8, 32Gi or 1.5"
    elif error.validator == "format":
        message = f"{error.instance!r} is out of range for {error.validator_value}"
    return [Problem(format_path(path), message)]


def _schema_problems(schema: dict[str, Any], obj: dict[str, Any]) -> tuple[list[Problem], bool]:
    """The schema's problems with `obj`, and whether any is a value of the wrong type (a list for a mapping)."""
    errors = list(_CrdValidator(schema, format_checker=_FORMATS).iter_errors(obj))
    wrong_type = any(error.validator == "type" for error in errors)
    return [problem for error in errors for problem in _error_problems(error)], wrong_type


def wrong_types(obj: dict[str, Any], schemas_dir: Path = SCHEMAS_DIR) -> list[Problem]:
    """The fields of a custom resource that hold a value of the wrong type for its CRD (a list where a mapping
    goes), for code that reads it field by field; none where its CRD schema is not at hand."""
    group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    try:
        schema = crd_schema(group, version, str(obj.get("kind")), schemas_dir)
    except (KeyError, SchemaError):
        return []
    errors = _CrdValidator(schema, format_checker=_FORMATS).iter_errors(_without_nulls(obj))
    return [problem for error in errors if error.validator == "type" for problem in _error_problems(error)]


def _unknown_fields(schema: dict[str, Any], value: Any, path: list[Any], problems: list[Problem]) -> None:
    """Keys the schema does not know, as `kubectl apply --validate=strict` would reject them."""
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            _unknown_fields(schema["items"], item, [*path, index], problems)
    if not isinstance(value, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    properties = schema.get("properties")
    if properties is not None:
        for key, item in value.items():
            if key in properties:
                _unknown_fields(properties[key], item, [*path, key], problems)
            else:
                problems.append(Problem(format_path([*path, key]), "unknown field" + _known_hint(key, properties)))
    elif isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            _unknown_fields(schema["additionalProperties"], item, [*path, key], problems)
    elif path and path[-1] == "metadata":
        for error in _object_meta_validator().iter_errors(value):
            for problem in _error_problems(error):
                where = format_path(path) + (f".{problem.path}" if problem.path else "")
                problems.append(Problem(where, problem.message))


def _known_hint(key: str, properties: dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(properties), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    names = sorted(properties)
    return f"; known fields here: {', '.join(names[:15])}{', ...' if len(names) > 15 else ''}"


def _apply_defaults(schema: dict[str, Any], value: Any) -> None:
    """Fill schema defaults into objects that are present, as the API server does before CEL runs."""
    if isinstance(value, dict):
        for key, child in (schema.get("properties") or {}).items():
            if key not in value and "default" in child:
                value[key] = copy.deepcopy(child["default"])
            if key in value:
                _apply_defaults(child, value[key])
        if isinstance(schema.get("additionalProperties"), dict):
            for item in value.values():
                _apply_defaults(schema["additionalProperties"], item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _apply_defaults(schema["items"], item)


@functools.cache
def _cel_program(rule: str) -> Any:
    import celpy

    environment = celpy.Environment()
    return environment.program(environment.compile(rule))


def _cel_rules(schema: dict[str, Any], value: Any, path: list[Any], problems: list[Problem]) -> None:
    """Evaluate each CEL rule on the value it guards; transition rules (oldSelf) only apply to updates."""
    import celpy

    for rule in schema.get("x-kubernetes-validations") or []:
        if "oldSelf" in rule["rule"]:
            continue
        try:
            passed = bool(_cel_program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)}))
        except Exception as error:  # a rule that cannot run is reported, never skipped
            problems.append(Problem(format_path(path), f"CEL rule {rule['rule']!r} could not run: {error}"))
            continue
        if not passed:
            problems.append(Problem(format_path(path), rule.get("message") or f"fails CEL rule {rule['rule']!r}"))
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for key, item in value.items():
            child = properties.get(key, schema.get("additionalProperties"))
            if isinstance(child, dict):
                _cel_rules(child, item, [*path, key], problems)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            _cel_rules(schema["items"], item, [*path, index], problems)


def _label_problems(labels: Any, path: str) -> list[Problem]:
    if not isinstance(labels, dict):
        return []
    problems = []
    for key, value in labels.items():
        if problem := label_key_problem(str(key)):
            problems.append(Problem(f"{path}.{key}", problem))
        value_problem = label_value_problem(value) if isinstance(value, str) else f"{value!r} is not text"
        if value_problem:
            problems.append(Problem(f"{path}.{key}", value_problem))
    return problems


def _kuberay_problems(body: dict[str, Any], at: str) -> list[Problem]:
    """Rules the KubeRay operator (v1.7) checks when it reconciles a RayClusterSpec."""
    problems = []
    autoscaling = bool(body.get("enableInTreeAutoscaling"))
    autoscaler_v2 = autoscaling and (body.get("autoscalerOptions") or {}).get("version") == "v2"
    head = body.get("headGroupSpec") or {}
    groups = [(f"{at}.headGroupSpec", head)] + [
        (f"{at}.workerGroupSpecs[{i}]", group) for i, group in enumerate(body.get("workerGroupSpecs") or [])
    ]
    for path, group in groups:
        params = group.get("rayStartParams") or {}
        if "labels" in params:
            problems.append(Problem(f"{path}.rayStartParams.labels", "not supported; use the group's labels field"))
        resource_params = {"num-cpus", "num-gpus", "memory", "resources"} & set(params)
        if resource_params and group.get("resources"):
            problems.append(
                Problem(f"{path}.resources", f"conflicts with rayStartParams {sorted(resource_params)}; use only one")
            )
        problems.extend(_label_problems(group.get("labels"), f"{path}.labels"))
        restart = ((group.get("template") or {}).get("spec") or {}).get("restartPolicy")
        if autoscaler_v2 and restart not in (None, "Never"):
            problems.append(Problem(f"{path}.template.spec.restartPolicy", "must be Never or unset with autoscaler v2"))
        if path.endswith("headGroupSpec"):
            continue
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if isinstance(low, int) and isinstance(high, int) and low > high:
            problems.append(Problem(f"{path}.minReplicas", f"{low} is above maxReplicas {high}"))
    if (body.get("authOptions") or {}).get("mode") == "token":
        version = ray_version_parts(body.get("rayVersion"))
        if version is None or version < MIN_TOKEN_AUTH_RAY:
            problems.append(
                Problem(f"{at}.rayVersion", "authOptions.mode token needs rayVersion 2.52.0 or later; set rayVersion")
            )
    return problems


def _operator_problems(obj: dict[str, Any]) -> list[Problem]:
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    problems = []
    name = (obj.get("metadata") or {}).get("name", "")
    if not _DNS_1035.fullmatch(str(name)) or len(str(name)) > 63:
        problems.append(
            Problem("metadata.name", f"{name!r} must be a DNS-1035 label (a-z, 0-9, '-', starting with a letter)")
        )
    bodies = {"RayCluster": ("spec", spec), "RayJob": ("spec.rayClusterSpec", spec.get("rayClusterSpec"))}
    bodies["RayService"] = ("spec.rayClusterConfig", spec.get("rayClusterConfig"))
    at, body = bodies.get(kind, ("", None))
    if isinstance(body, dict):
        problems.extend(_kuberay_problems(body, at))
    if kind == "RayJob" and spec.get("submissionMode") == "SidecarMode" and isinstance(body, dict):
        restart = ((body.get("headGroupSpec") or {}).get("template") or {}).get("spec", {}).get("restartPolicy")
        if restart not in (None, "Never"):
            problems.append(
                Problem(f"{at}.headGroupSpec.template.spec.restartPolicy", "must be Never with SidecarMode")
            )
    if kind == "RayJob" and spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        problems.append(Problem("spec.suspend", "a suspended RayJob needs shutdownAfterJobFinishes: true"))
    return problems


def _without_nulls(value: Any) -> Any:
    """Drop null fields, as the API server prunes them before validating."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def validate_object(obj: Any, schemas_dir: Path = SCHEMAS_DIR) -> list[Problem]:
    """Problems of one manifest object; an empty list when the API server and KubeRay would accept it."""
    if not isinstance(obj, dict):
        return [Problem("", f"expected a Kubernetes object (a mapping), got {type(obj).__name__}")]
    missing = [Problem(field, "required field is missing") for field in ("apiVersion", "kind") if not obj.get(field)]
    if missing:
        return missing
    not_text = [
        Problem(field, f"{obj[field]!r} is not a string")
        for field in ("apiVersion", "kind")
        if not isinstance(obj[field], str)
    ]
    if not isinstance(obj.get("metadata", {}), dict):
        not_text.append(Problem("metadata", f"expected a mapping, got {type(obj['metadata']).__name__}"))
    if not_text:
        return not_text
    obj = _without_nulls(obj)
    group, _, version = str(obj["apiVersion"]).rpartition("/")
    problems = _label_problems((obj.get("metadata") or {}).get("labels"), "metadata.labels")
    if group not in CRD_GROUPS:
        import kubernetes_validate
        from kubernetes_validate.utils import SchemaNotFoundError

        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except SchemaNotFoundError as error:
            problems.append(Problem("kind", error.message))
        except kubernetes_validate.ValidationError as error:
            problems.extend(_error_problems(error))
        return problems
    try:
        schema = crd_schema(group, version, obj["kind"], schemas_dir)
    except KeyError as error:
        return [*problems, Problem("apiVersion", str(error.args[0]))]
    schema_problems, wrong_type = _schema_problems(schema, obj)
    problems.extend(schema_problems)
    _unknown_fields(schema, obj, [], problems)
    if wrong_type:
        return problems  # the rules below read the object in the schema's shape
    defaulted = copy.deepcopy(obj)
    _apply_defaults(schema, defaulted)
    _cel_rules(schema, defaulted, [], problems)
    if group == "ray.io":
        problems.extend(_operator_problems(obj))
    return problems


def describe(obj: Any) -> str:
    if not isinstance(obj, dict):
        return "document"
    metadata = obj.get("metadata")
    return f"{obj.get('kind', '?')}/{metadata.get('name', '?') if isinstance(metadata, dict) else '?'}"


def validate_documents(objects: Iterable[Any], schemas_dir: Path = SCHEMAS_DIR) -> list[str]:
    """One line per problem, each naming the object and the field path."""
    return [f"{describe(obj)}: {problem}" for obj in objects for problem in validate_object(obj, schemas_dir)]
