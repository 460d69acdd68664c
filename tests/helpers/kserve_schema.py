"""A JSON Schema for KServe's InferenceService (serving.kserve.io/v1beta1), checked offline.

KServe publishes its schema only inside its CRD, which no PyPI package ships. Its CRD is generated
from the Go types in kserve/kserve pkg/apis/serving/v1beta1 (release 0.21, the version of the
`kserve` SDK on PyPI, whose generated models list the same fields), and those types are small:

- InferenceServiceSpec: predictor (required), explainer, transformer, canary.
- PredictorSpec inlines KServe's PodSpec, a copy of core/v1 PodSpec whose `containers` is optional,
  plus ComponentExtensionSpec (the scaling and traffic fields below), the model-framework specs,
  name, storageUris, storageContainerName and workerSpec.

So this schema takes every PodSpec field, container and volume definition from the Kubernetes schema
that kubernetes-validate ships (strict: unknown fields are errors) and adds the KServe fields with
their Go types and kubebuilder enums. Objects this project does not use (explainer, logger, model,
...) are only checked to be objects.
"""

import copy
import functools
import json
from importlib import resources

K8S_DEFS = "#/$defs/io.k8s."
INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
INT64 = {"type": "integer"}
OBJECT = {"type": "object"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

# ComponentExtensionSpec (component.go); enums from its kubebuilder markers.
COMPONENT_EXTENSION_FIELDS = {
    "minReplicas": INT32,
    "maxReplicas": INT32,
    "scaleTarget": INT32,
    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "scaleMetricType": {"enum": ["Utilization", "Value", "AverageValue"]},
    "autoScaling": OBJECT,
    "containerConcurrency": INT64,
    "timeout": INT64,
    "canaryTrafficPercent": INT64,
    "logger": OBJECT,
    "batcher": OBJECT,
    "labels": STRING_MAP,
    "annotations": STRING_MAP,
    "deploymentStrategy": {"$ref": K8S_DEFS + "api.apps.v1.DeploymentStrategy"},
}

# PredictorSpec's own fields (predictor.go).
FRAMEWORKS = (
    "sklearn",
    "xgboost",
    "tensorflow",
    "pytorch",
    "triton",
    "onnx",
    "huggingface",
    "pmml",
    "lightgbm",
    "paddle",
)
PREDICTOR_FIELDS = {
    **{framework: OBJECT for framework in FRAMEWORKS},
    "model": OBJECT,
    "name": {"type": "string"},
    "storageUris": {"type": "array", "items": OBJECT},
    "storageContainerName": {"type": "string"},
    "workerSpec": OBJECT,
}


def kubernetes_definitions(version: str) -> dict:
    """The strict core definitions kubernetes-validate ships for Kubernetes `version` ("1.33")."""
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}.0-local-strict"
    return json.loads((folder / "_definitions.json").read_text())["$defs"]


@functools.cache
def inference_service_schema(k8s_version: str) -> dict:
    defs = copy.deepcopy(kubernetes_definitions(k8s_version))
    pod_spec = defs["io.k8s.api.core.v1.PodSpec"]
    predictor = {
        "type": "object",
        "properties": {**pod_spec["properties"], **COMPONENT_EXTENSION_FIELDS, **PREDICTOR_FIELDS},
        "additionalProperties": False,
    }
    spec = {
        "type": "object",
        "properties": {
            "predictor": {"$ref": "#/$defs/kserve.PredictorSpec"},
            "explainer": OBJECT,
            "transformer": OBJECT,
            "canary": {"type": "array", "items": OBJECT},
        },
        "required": ["predictor"],
        "additionalProperties": False,
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "apiVersion": {"const": "serving.kserve.io/v1beta1"},
            "kind": {"const": "InferenceService"},
            "metadata": {"$ref": K8S_DEFS + "apimachinery.pkg.apis.meta.v1.ObjectMeta"},
            "spec": {"$ref": "#/$defs/kserve.InferenceServiceSpec"},
        },
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "$defs": {**defs, "kserve.PredictorSpec": predictor, "kserve.InferenceServiceSpec": spec},
    }
