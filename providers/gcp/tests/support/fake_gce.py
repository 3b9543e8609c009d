#!/usr/bin/env python3
"""A stateful fake of the Google Compute Engine v1 REST API, for tests.

What it fakes (paths exactly as the real API, under /compute/v1):

* instances: aggregatedList, list, get, insert, bulkInsert, delete, stop,
  start, setLabels, setMetadata;
* zoneOperations get/wait, globalOperations get/wait;
* projects get and setCommonInstanceMetadata.

Responses use the real shapes of the compute v1 discovery document
(compute#instance, compute#operation, compute#instanceAggregatedList, ...)
and Google's JSON error body ({"error": {"code", "message", "errors": [...]}}).
Operations go PENDING -> RUNNING -> DONE over wall time and a change takes
effect when its operation completes. Failures that the real API reports
inside a finished operation (QUOTA_EXCEEDED, ZONE_RESOURCE_POOL_EXHAUSTED)
are reported there too, with httpErrorStatusCode/httpErrorMessage; the POST
itself answers 200.

What it refuses, as the real API does (a fake that accepts more hides bugs):

* a requestId that is not a UUID, or the zero UUID (400); a repeated
  requestId returns the first operation and makes nothing new;
* unknown query parameters and unknown fields in request bodies (400);
* names, label keys/values, metadata keys/sizes, machine types, zones,
  image and network URLs that the real API rejects (400); an existing
  instance name on insert (409 alreadyExists);
* setLabels/setMetadata/setCommonInstanceMetadata without the current
  fingerprint (412 conditionNotMet);
* maxResults above 500, page tokens it did not issue (400);
* any filter it does not understand (400): it never ignores a filter.

What it does not model, and refuses rather than ignores: instance templates
(sourceInstanceTemplate), attaching existing disks (disks[].source), filters
other than equality/inequality on labels.KEY, name and status plus
labels.KEY:* (no OR, no regex eq/ne dialect).

Test control, not part of the real API, under /_fake/ (faults never apply there):

* POST /_fake/config  partial update, answers the whole config:
    {"stage_ms": 150,                 # time per operation stage
     "wait_ms": 2000,                 # how long operations/{op}/wait waits
     "default_cpu_quota": 1000,       # CPUS per project and region
     "cpu_quota": {"us-central1": 24},          # per region; null drops it
     "exhausted_zones": ["us-central1-a"],      # replaces the list
     "faults": {"rate": 0.2, "kinds": ["429", "503", "lost"], "seed": 1,
                "methods": ["POST", "GET", "DELETE"]}}
  A bad key or value answers 400 {"error": "..."}.
* GET /_fake/config    the config.
* GET /_fake/requests  {"METHOD template": count}, e.g. "GET aggregated/instances",
  "POST instances/bulkInsert"; faulted requests count too.
* POST /_fake/reset    forgets everything: state, counts, config.
* GET /_fake/instances {"instances": [{project, zone, name, id, status,
  machineType, labels, metadata: {key: value}, networkIP, natIP, scheduling}]}.

Faults: "429" answers 429 rateLimitExceeded, "503" answers 503 backendError,
both without doing the work; "lost" does the work, then closes the connection
without an answer.

Run: python3 fake_gce.py --port 0 [--host 127.0.0.1] [--seed N] [--stage-ms MS]
It prints one line "listening on http://127.0.0.1:PORT" once ready and serves
until SIGTERM/SIGINT. Importable: FakeGce(port=0).start() ... .url ... .stop().
"""

import argparse
import base64
import copy
import ipaddress
import json
import random
import re
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# ---------------------------------------------------------------------------
# Catalog: zones, machine types, URL forms
# ---------------------------------------------------------------------------

API_ROOT = "https://www.googleapis.com"
BASE = API_ROOT + "/compute/v1"

ZONES = {
    z: z.rsplit("-", 1)[0]
    for z in (
        "us-central1-a", "us-central1-b", "us-central1-c", "us-central1-f",
        "us-east1-b", "us-east1-c", "us-east1-d",
        "europe-west1-b", "europe-west1-c", "europe-west1-d",
        "europe-west4-a", "europe-west4-b", "europe-west4-c",
    )
}
REGIONS = sorted(set(ZONES.values()))

# name -> (vCPUs, memory MiB)
MACHINE_TYPES = {
    "e2-micro": (2, 1024), "e2-small": (2, 2048), "e2-medium": (2, 4096),
    "e2-standard-2": (2, 8192), "e2-standard-4": (4, 16384),
    "e2-standard-8": (8, 32768), "e2-standard-16": (16, 65536),
    "e2-highmem-2": (2, 16384), "e2-highmem-4": (4, 32768),
    "e2-highmem-8": (8, 65536),
    "n2-standard-2": (2, 8192), "n2-standard-4": (4, 16384),
    "n2-standard-8": (8, 32768), "n2-standard-16": (16, 65536),
    "n2-standard-32": (32, 131072),
    "n2-highmem-2": (2, 16384), "n2-highmem-4": (4, 32768),
    "n2-highmem-8": (8, 65536),
    "n2d-standard-2": (2, 8192), "n2d-standard-4": (4, 16384),
    "n2d-standard-8": (8, 32768), "n2d-standard-16": (16, 65536),
    "c3-standard-4": (4, 16384), "c3-standard-8": (8, 32768),
    "c3-standard-22": (22, 90112), "c3-standard-44": (44, 180224),
}
CPU_PLATFORMS = {"e2": "Intel Broadwell", "n2": "Intel Cascade Lake",
                 "n2d": "AMD Rome", "c3": "Intel Sapphire Rapids"}

NAME_PATTERN = r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?"
NAME_RE = re.compile(NAME_PATTERN)
PROJECT_PATTERN = (r"(?:(?:[-a-z0-9]{1,63}\.)*(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?):)?"
                   r"(?:[0-9]{1,19}|(?:[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?))")
PROJECT_RE = re.compile(PROJECT_PATTERN)
LABEL_KEY_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}")
LABEL_VALUE_RE = re.compile(r"[a-z0-9_-]{0,63}")
METADATA_KEY_RE = re.compile(r"[a-zA-Z0-9_-]{1,128}")
MAX_LABELS = 64
MAX_METADATA_VALUE = 256 * 1024
MAX_METADATA_TOTAL = 512 * 1024
INSTANCE_STATUSES = ("DEPROVISIONING", "PROVISIONING", "REPAIRING", "RUNNING", "STAGING",
                     "STOPPED", "STOPPING", "SUSPENDED", "SUSPENDING", "TERMINATED")
URL_PREFIX = r"(?:https://(?:www|compute)\.googleapis\.com/compute/v1/)?"
MACHINE_TYPE_URL_RE = re.compile(
    r"(?:" + URL_PREFIX + r"projects/(?P<project>[^/]+)/)?zones/(?P<zone>[^/]+)/machineTypes/(?P<type>[^/]+)")
IMAGE_URL_RE = re.compile(
    r"(?:" + URL_PREFIX + r"projects/(?P<project>[^/]+)/)?global/images/(?:(?P<family>family)/)?(?P<name>"
    + NAME_PATTERN + r")")
NETWORK_URL_RE = re.compile(
    r"(?:" + URL_PREFIX + r"projects/(?P<project>[^/]+)/)?global/networks/(?P<name>" + NAME_PATTERN + r")")
SUBNETWORK_URL_RE = re.compile(
    r"(?:" + URL_PREFIX + r"projects/(?P<project>[^/]+)/)?regions/(?P<region>[^/]+)/subnetworks/(?P<name>"
    + NAME_PATTERN + r")")
DISK_TYPE_URL_RE = re.compile(
    r"(?:" + URL_PREFIX + r"projects/(?P<project>[^/]+)/)?zones/(?P<zone>[^/]+)/diskTypes/(?P<name>[a-z0-9-]+)")

# Query parameters every method accepts (the discovery document's "parameters").
STANDARD_PARAMS = {"$.xgafv", "access_token", "alt", "callback", "fields", "key", "oauth_token",
                   "prettyPrint", "quotaUser", "uploadType", "upload_protocol", "userIp"}
# Google's front end also takes the system parameters with a `$` prefix;
# Google's own Rust clients send `$alt=json` and the API version they were
# generated from (`$apiVersion=2026-09-01`) on every call.
STANDARD_PARAMS |= {"$" + p for p in STANDARD_PARAMS if not p.startswith("$")} | {"$apiVersion"}
LIST_PARAMS = {"filter", "maxResults", "orderBy", "pageToken", "returnPartialSuccess"}
AGGREGATED_PARAMS = LIST_PARAMS | {"includeAllScopes", "serviceProjectNumber"}
MUTATION_PARAMS = {"requestId"}

# Request body fields (discovery schemas), to refuse unknown ones as the API does.
INSTANCE_FIELDS = {
    "advancedMachineFeatures", "canIpForward", "confidentialInstanceConfig", "cpuPlatform",
    "creationTimestamp", "deletionProtection", "description", "disks", "displayDevice",
    "fingerprint", "guestAccelerators", "hostname", "id", "instanceEncryptionKey",
    "keyRevocationActionType", "kind", "labelFingerprint", "labels", "lastStartTimestamp",
    "lastStopTimestamp", "lastSuspendedTimestamp", "machineType", "metadata", "minCpuPlatform",
    "name", "networkInterfaces", "networkPerformanceConfig", "params", "privateIpv6GoogleAccess",
    "reservationAffinity", "resourcePolicies", "resourceStatus", "satisfiesPzi", "satisfiesPzs",
    "scheduling", "selfLink", "serviceAccounts", "shieldedInstanceConfig",
    "shieldedInstanceIntegrityPolicy", "sourceMachineImage", "sourceMachineImageEncryptionKey",
    "startRestricted", "status", "statusMessage", "tags", "zone",
}
INSTANCE_PROPERTIES_FIELDS = {
    "advancedMachineFeatures", "canIpForward", "confidentialInstanceConfig", "description",
    "disks", "guestAccelerators", "keyRevocationActionType", "labels", "machineType", "metadata",
    "minCpuPlatform", "networkInterfaces", "networkPerformanceConfig", "privateIpv6GoogleAccess",
    "reservationAffinity", "resourceManagerTags", "resourcePolicies", "scheduling",
    "serviceAccounts", "shieldedInstanceConfig", "tags",
}
BULK_FIELDS = {"count", "instanceFlexibilityPolicy", "instanceProperties", "locationPolicy",
               "minCount", "namePattern", "perInstanceProperties", "sourceInstanceTemplate"}
PER_INSTANCE_FIELDS = {"hostname", "name"}
ATTACHED_DISK_FIELDS = {
    "architecture", "autoDelete", "boot", "deviceName", "diskEncryptionKey", "diskSizeGb",
    "forceAttach", "guestOsFeatures", "index", "initializeParams", "interface", "kind", "licenses",
    "mode", "savedState", "shieldedInstanceInitialState", "source", "type",
}
INITIALIZE_PARAMS_FIELDS = {
    "architecture", "description", "diskName", "diskSizeGb", "diskType",
    "enableConfidentialCompute", "labels", "licenses", "onUpdateAction", "provisionedIops",
    "provisionedThroughput", "replicaZones", "resourceManagerTags", "resourcePolicies",
    "sourceImage", "sourceImageEncryptionKey", "sourceSnapshot", "sourceSnapshotEncryptionKey",
    "storagePool",
}
NIC_FIELDS = {
    "accessConfigs", "aliasIpRanges", "fingerprint", "internalIpv6PrefixLength",
    "ipv6AccessConfigs", "ipv6AccessType", "ipv6Address", "kind", "name", "network",
    "networkAttachment", "networkIP", "nicType", "queueCount", "stackType", "subnetwork",
}
ACCESS_CONFIG_FIELDS = {"externalIpv6", "externalIpv6PrefixLength", "kind", "name", "natIP",
                        "networkTier", "publicPtrDomainName", "securityPolicy", "setPublicPtr",
                        "type"}
SCHEDULING_FIELDS = {
    "automaticRestart", "availabilityDomain", "instanceTerminationAction",
    "localSsdRecoveryTimeout", "locationHint", "maxRunDuration", "minNodeCpus", "nodeAffinities",
    "onHostMaintenance", "onInstanceStopAction", "preemptible", "provisioningModel",
    "terminationTime",
}
METADATA_FIELDS = {"fingerprint", "items", "kind"}
METADATA_ITEM_FIELDS = {"key", "value"}
SERVICE_ACCOUNT_FIELDS = {"email", "scopes"}
TAGS_FIELDS = {"fingerprint", "items"}
SET_LABELS_FIELDS = {"labelFingerprint", "labels"}

FAULT_KINDS = ("429", "503", "lost")
FAULT_METHODS = ("GET", "POST", "DELETE")
DEFAULT_CPU_QUOTA = 1000
WAIT_MS = 2000
PACIFIC = timezone(timedelta(hours=-7))


def rfc3339(t):
    """Timestamps as the API writes them: millisecond precision, with an offset."""
    return datetime.fromtimestamp(t, PACIFIC).isoformat(timespec="milliseconds")


def project_url(project):
    return f"{BASE}/projects/{project}"


def zone_url(project, zone):
    return f"{BASE}/projects/{project}/zones/{zone}"


def instance_url(project, zone, name):
    return f"{zone_url(project, zone)}/instances/{name}"


def bare_type(machine_type_url):
    return machine_type_url.rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------
# Errors in Google's shape
# ---------------------------------------------------------------------------

class ApiError(Exception):
    """An error answered synchronously, in the API's JSON error shape."""

    def __init__(self, status, reason, message, *, domain="global", location=None,
                 location_type=None, rpc_status=None, details=None):
        super().__init__(message)
        item = {"message": message, "domain": domain, "reason": reason}
        if location is not None:
            item["location"] = location
            item["locationType"] = location_type
        body = {"code": status, "message": message, "errors": [item]}
        if rpc_status:
            body["status"] = rpc_status
        if details:
            body["details"] = details
        self.status = status
        self.body = {"error": body}


def invalid(field, value, why):
    return ApiError(400, "invalid", f"Invalid value for field '{field}': '{value}'. {why}")


def required(field):
    return ApiError(400, "required", f"Required field '{field}' not specified")


def not_found(path):
    return ApiError(404, "notFound", f"The resource '{path}' was not found")


def unsupported(field, value, what):
    """Something the real API may accept but this fake does not model: refused."""
    return invalid(field, value, f"{what} (not supported by fake_gce)")


def bad_payload(message):
    """The API front end's answer to JSON it cannot bind (unknown names, wrong types)."""
    return ApiError(400, "invalid", message, rpc_status="INVALID_ARGUMENT",
                    details=[{"@type": "type.googleapis.com/google.rpc.BadRequest",
                              "fieldViolations": [{"description": message}]}])


def unknown_field(name, where):
    return bad_payload(f"Invalid JSON payload received. Unknown name \"{name}\" at '{where}': "
                       "Cannot find field.")


def wrong_type(where, proto_type, value):
    return bad_payload(f"Invalid value at '{where}' ({proto_type}), {json.dumps(value)}")


def rate_limited(project):
    message = ("Quota exceeded for quota metric 'Queries' and limit 'Queries per minute' of service "
               f"'compute.googleapis.com' for consumer 'project_number:{project_number(project)}'.")
    return ApiError(429, "rateLimitExceeded", message, domain="usageLimits",
                    rpc_status="RESOURCE_EXHAUSTED",
                    details=[{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                              "reason": "RATE_LIMIT_EXCEEDED", "domain": "googleapis.com",
                              "metadata": {"service": "compute.googleapis.com",
                                           "quota_metric": "compute.googleapis.com/default",
                                           "quota_limit": "defaultPerMinutePerProject",
                                           "quota_limit_value": "1500",
                                           "quota_location": "global",
                                           "consumer": f"projects/{project_number(project)}"}},
                             {"@type": "type.googleapis.com/google.rpc.Help",
                              "links": [{"description": "Request a higher quota limit.",
                                         "url": "https://cloud.google.com/docs/quotas/help/request_increase"}]}])


def backend_error():
    return ApiError(503, "backendError", "Internal error. Please try again or contact Google Support. "
                    "(Code: '-3351839124683924713')")


def project_number(project):
    return str(int.from_bytes(project.encode(), "big") % 10**12).rjust(12, "1")


def check_fields(obj, allowed, where):
    if not isinstance(obj, dict):
        raise bad_payload(f"Invalid JSON payload received. Expected an object at '{where}'.")
    for name in obj:
        if name not in allowed:
            raise unknown_field(name, where)


def check_type(value, kind, where, proto_type):
    """None passes (the field is unset); JSON booleans are not numbers or strings."""
    if value is None:
        return
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise wrong_type(where, proto_type, value)


def parse_int64(value, where):
    """int64 fields travel as JSON strings or numbers."""
    if isinstance(value, bool):
        raise wrong_type(where, "TYPE_INT64", value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value):
        return int(value)
    raise wrong_type(where, "TYPE_INT64", value)


# ---------------------------------------------------------------------------
# Validation of request bodies
# ---------------------------------------------------------------------------

def validate_name(name, field):
    if not isinstance(name, str) or not name:
        raise required(field)
    if not NAME_RE.fullmatch(name):
        raise invalid(field, name, f"Must be a match of regex '(?:{NAME_PATTERN})'")
    return name


def validate_labels(labels, field):
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise wrong_type(field, "TYPE_MESSAGE", labels)
    if len(labels) > MAX_LABELS:
        raise invalid(field, "", f"Too many labels: {len(labels)}. At most {MAX_LABELS} labels are allowed.")
    for key, value in labels.items():
        if not isinstance(value, str):
            raise wrong_type(f"{field}[{key}].value", "TYPE_STRING", value)
        if not LABEL_KEY_RE.fullmatch(key):
            raise invalid(field, "", f"Label key '{key}' violates format constraints. The key must start "
                          "with a lowercase character, can only contain lowercase letters, numeric "
                          "characters, underscores and dashes. The key can be at most 63 characters long. "
                          "International characters are allowed.")
        if not LABEL_VALUE_RE.fullmatch(value):
            raise invalid(field, "", f"Label value '{value}' of key '{key}' violates format constraints. "
                          "The value can only contain lowercase letters, numeric characters, underscores "
                          "and dashes. The value can be at most 63 characters long. International "
                          "characters are allowed.")
    return dict(labels)


def validate_metadata_items(items, field):
    """Returns the items as a list of {"key", "value"}; refuses what the API refuses."""
    if items is None:
        return []
    if not isinstance(items, list):
        raise wrong_type(f"{field}.items", "TYPE_MESSAGE", items)
    seen, total, out = set(), 0, []
    for i, item in enumerate(items):
        where = f"{field}.items[{i}]"
        check_fields(item, METADATA_ITEM_FIELDS, where)
        key, value = item.get("key"), item.get("value", "")
        check_type(key, str, f"{where}.key", "TYPE_STRING")
        check_type(value, str, f"{where}.value", "TYPE_STRING")
        if key is None:
            raise required(f"{where}.key")
        if not METADATA_KEY_RE.fullmatch(key):
            raise invalid(f"{where}.key", key, f"Must be a match of regex '{METADATA_KEY_RE.pattern}'")
        if key in seen:
            raise invalid(f"{where}.key", key, "Duplicate metadata key.")
        seen.add(key)
        size = len(value.encode())
        if size > MAX_METADATA_VALUE:
            raise invalid(f"{where}.value", "", f"Value for field '{where}.value' is too large: maximum "
                          f"size {MAX_METADATA_VALUE} character(s); actual size {size}.")
        total += size + len(key.encode())
        out.append({"key": key, "value": value})
    if total > MAX_METADATA_TOTAL:
        raise invalid(field, "", f"Metadata is too large: the total size of all keys and values may not "
                      f"exceed {MAX_METADATA_TOTAL} bytes; actual size {total}.")
    return out


def parse_machine_type(value, project, zone, field, bare):
    """The type name; insert takes a (partial) URL, bulkInsert's instanceProperties a bare name."""
    if not value:
        raise required(field)
    check_type(value, str, field, "TYPE_STRING")
    if bare:
        name = value
    else:
        m = MACHINE_TYPE_URL_RE.fullmatch(value)
        if not m:
            raise invalid(field, value, "The URL is malformed.")
        if m["project"] not in (None, project) or m["zone"] != zone:
            raise invalid(field, value, f"Machine type with name '{m['type']}' does not exist in zone '{zone}'.")
        name = m["type"]
    if name not in MACHINE_TYPES:
        shown = value if not bare else f"zones/{zone}/machineTypes/{value}"
        raise invalid(field, shown, f"Machine type with name '{name}' does not exist in zone '{zone}'.")
    return name


def validate_scheduling(sched, field):
    sched = sched or {}
    check_fields(sched, SCHEDULING_FIELDS, field)
    model = sched.get("provisioningModel", "STANDARD")
    if model not in ("STANDARD", "SPOT"):
        if model in ("FLEX_START", "RESERVATION_BOUND"):
            raise unsupported(f"{field}.provisioningModel", model, "Only STANDARD and SPOT are modelled.")
        raise bad_payload(f"Invalid value at '{field}.provisioning_model' (type.googleapis.com/"
                          f"google.cloud.compute.v1.Scheduling.ProvisioningModel), \"{model}\"")
    spot = model == "SPOT" or sched.get("preemptible") is True
    action = sched.get("instanceTerminationAction")
    if action is not None and action not in ("STOP", "DELETE"):
        raise bad_payload(f"Invalid value at '{field}.instance_termination_action' (type.googleapis.com/"
                          f"google.cloud.compute.v1.Scheduling.InstanceTerminationAction), \"{action}\"")
    if spot and sched.get("automaticRestart") is True:
        raise invalid(f"{field}.automaticRestart", "true",
                      "Scheduling must have preemptible be false when AutomaticRestart is true.")
    if spot and sched.get("onHostMaintenance") == "MIGRATE":
        raise invalid(f"{field}.onHostMaintenance", "MIGRATE",
                      "Scheduling must have preemptible be false when OnHostMaintenance isn't TERMINATE.")
    out = {
        "onHostMaintenance": "TERMINATE" if spot else sched.get("onHostMaintenance", "MIGRATE"),
        "automaticRestart": False if spot else sched.get("automaticRestart", True),
        "preemptible": spot,
        "provisioningModel": "SPOT" if spot else "STANDARD",
    }
    if spot:
        out["instanceTerminationAction"] = action or "STOP"
    elif action:
        out["instanceTerminationAction"] = action
    return out


def validate_disks(disks, project, zone, field):
    """Disks as the instance will show them, less names (filled in per instance)."""
    if not disks:
        raise required(field)
    if not isinstance(disks, list):
        raise wrong_type(field, "TYPE_MESSAGE", disks)
    out = []
    for i, disk in enumerate(disks):
        where = f"{field}[{i}]"
        check_fields(disk, ATTACHED_DISK_FIELDS, where)
        boot = disk.get("boot", False)
        if i == 0 and boot is not True:
            raise invalid(f"{where}.boot", str(boot).lower(), "The first disk must be the boot disk.")
        if i > 0 and boot is True:
            raise invalid(f"{where}.boot", "true", "Only one boot disk is allowed.")
        if disk.get("source"):
            raise unsupported(f"{where}.source", disk["source"], "Attaching existing disks")
        params = disk.get("initializeParams")
        if params is None:
            raise required(f"{where}.initializeParams")
        check_fields(params, INITIALIZE_PARAMS_FIELDS, f"{where}.initializeParams")
        image = params.get("sourceImage")
        licenses = []
        if boot:
            if not image:
                raise required(f"{where}.initializeParams.sourceImage")
            m = IMAGE_URL_RE.fullmatch(image) if isinstance(image, str) else None
            if not m:
                raise invalid(f"{where}.initializeParams.sourceImage", image, "The URL is malformed.")
            licenses = [f"{BASE}/projects/{m['project'] or project}/global/licenses/{m['name']}"]
        size = params.get("diskSizeGb", "10")
        size = parse_int64(size, f"{where}.initializeParams.diskSizeGb")
        if size < 10 and boot:
            raise invalid(f"{where}.initializeParams.diskSizeGb", str(size),
                          "Requested disk size cannot be smaller than the image size (10 GB).")
        disk_type = params.get("diskType")
        if disk_type is not None:
            m = DISK_TYPE_URL_RE.fullmatch(disk_type) if isinstance(disk_type, str) else None
            if not m or m["zone"] != zone:
                raise invalid(f"{where}.initializeParams.diskType", disk_type, "The URL is malformed.")
        disk_name = params.get("diskName")
        if disk_name is not None:
            validate_name(disk_name, f"{where}.initializeParams.diskName")
        out.append({
            "kind": "compute#attachedDisk",
            "type": disk.get("type", "PERSISTENT"),
            "mode": disk.get("mode", "READ_WRITE"),
            "deviceName": disk.get("deviceName") or f"persistent-disk-{i}",
            "index": i,
            "boot": bool(boot),
            "autoDelete": bool(disk.get("autoDelete", False)),
            "interface": disk.get("interface", "SCSI"),
            "diskSizeGb": str(size),
            "architecture": "X86_64",
            "licenses": licenses,
            "guestOsFeatures": ([{"type": "UEFI_COMPATIBLE"}, {"type": "VIRTIO_SCSI_MULTIQUEUE"},
                                 {"type": "GVNIC"}] if boot else []),
            "_diskName": disk_name,
        })
    return out


def validate_nics(nics, project, zone, field):
    if not nics:
        raise required(field)
    if not isinstance(nics, list):
        raise wrong_type(field, "TYPE_MESSAGE", nics)
    region = ZONES[zone]
    out = []
    for i, nic in enumerate(nics):
        where = f"{field}[{i}]"
        check_fields(nic, NIC_FIELDS, where)
        network = nic.get("network") or "global/networks/default"
        m = NETWORK_URL_RE.fullmatch(network) if isinstance(network, str) else None
        if not m:
            raise invalid(f"{where}.network", network, "The URL is malformed.")
        net_project, net_name = m["project"] or project, m["name"]
        subnet = nic.get("subnetwork")
        if subnet is not None:
            s = SUBNETWORK_URL_RE.fullmatch(subnet) if isinstance(subnet, str) else None
            if not s:
                raise invalid(f"{where}.subnetwork", subnet, "The URL is malformed.")
            if s["region"] != region:
                raise invalid(f"{where}.subnetwork", subnet,
                              f"Subnetwork must be in the same region as the instance ('{region}').")
            subnet_url = f"{BASE}/projects/{s['project'] or project}/regions/{region}/subnetworks/{s['name']}"
        else:
            subnet_url = f"{BASE}/projects/{net_project}/regions/{region}/subnetworks/{net_name}"
        ip = nic.get("networkIP")
        if ip is not None:
            try:
                ipaddress.IPv4Address(ip)
            except (ipaddress.AddressValueError, ValueError):
                raise invalid(f"{where}.networkIP", ip, "The IP address is malformed.") from None
        access = nic.get("accessConfigs") or []
        if len(access) > 1:
            raise invalid(f"{where}.accessConfigs", "", "At most one access config per network interface "
                          "is supported.")
        configs = []
        for j, ac in enumerate(access):
            check_fields(ac, ACCESS_CONFIG_FIELDS, f"{where}.accessConfigs[{j}]")
            kind = ac.get("type", "ONE_TO_ONE_NAT")
            if kind != "ONE_TO_ONE_NAT":
                raise bad_payload(f"Invalid value at '{where}.access_configs[{j}].type' (type.googleapis.com/"
                                  f"google.cloud.compute.v1.AccessConfig.Type), \"{kind}\"")
            configs.append({"kind": "compute#accessConfig", "type": "ONE_TO_ONE_NAT",
                            "name": ac.get("name", "External NAT"), "natIP": ac.get("natIP"),
                            "networkTier": ac.get("networkTier", "PREMIUM")})
        out.append({"network": f"{BASE}/projects/{net_project}/global/networks/{net_name}",
                    "subnetwork": subnet_url, "networkIP": ip, "accessConfigs": configs})
    return out


def validate_service_accounts(accounts, field):
    accounts = accounts or []
    if not isinstance(accounts, list):
        raise wrong_type(field, "TYPE_MESSAGE", accounts)
    if len(accounts) > 1:
        raise invalid(field, "", "At most one service account may be specified per instance.")
    out = []
    for i, sa in enumerate(accounts):
        check_fields(sa, SERVICE_ACCOUNT_FIELDS, f"{field}[{i}]")
        email = sa.get("email", "default")
        scopes = sa.get("scopes", [])
        check_type(email, str, f"{field}[{i}].email", "TYPE_STRING")
        check_type(scopes, list, f"{field}[{i}].scopes", "TYPE_STRING")
        out.append({"email": email, "scopes": list(scopes)})
    return out


def validate_tags(tags, field):
    tags = tags or {}
    check_fields(tags, TAGS_FIELDS, field)
    items = tags.get("items") or []
    check_type(items, list, f"{field}.items", "TYPE_STRING")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not NAME_RE.fullmatch(item):
            raise invalid(f"{field}.items[{i}]", item, f"Must be a match of regex '(?:{NAME_PATTERN})'")
    return list(items)


class InstanceSpec:
    """A validated instance body, before names, IPs and ids are given."""

    def __init__(self, project, zone, body, field, bulk):
        prefix = field + "."
        self.machine_type = parse_machine_type(body.get("machineType"), project, zone,
                                               prefix + "machineType", bare=bulk)
        self.disks = validate_disks(body.get("disks"), project, zone, prefix + "disks")
        self.nics = validate_nics(body.get("networkInterfaces"), project, zone, prefix + "networkInterfaces")
        self.labels = validate_labels(body.get("labels"), prefix + "labels")
        metadata = body.get("metadata") or {}
        check_fields(metadata, METADATA_FIELDS, prefix + "metadata")
        self.metadata = validate_metadata_items(metadata.get("items"), prefix + "metadata")
        self.scheduling = validate_scheduling(body.get("scheduling"), prefix + "scheduling")
        self.service_accounts = validate_service_accounts(body.get("serviceAccounts"), prefix + "serviceAccounts")
        self.tags = validate_tags(body.get("tags"), prefix + "tags")
        description = body.get("description")
        check_type(description, str, prefix + "description", "TYPE_STRING")
        self.description = description
        protect = body.get("deletionProtection", False)
        check_type(protect, bool, prefix + "deletionProtection", "TYPE_BOOL")
        self.deletion_protection = protect
        can_ip_forward = body.get("canIpForward", False)
        check_type(can_ip_forward, bool, prefix + "canIpForward", "TYPE_BOOL")
        self.can_ip_forward = can_ip_forward

    @property
    def vcpus(self):
        return MACHINE_TYPES[self.machine_type][0]


# ---------------------------------------------------------------------------
# List filters (the AIP-160 subset the fake understands)
# ---------------------------------------------------------------------------

class FilterError(Exception):
    pass


FILTER_TOKEN_RE = re.compile(
    r'\s*(?:(?P<lp>\()|(?P<rp>\))|(?P<op>!=|<=|>=|=|:|<|>|~)|(?P<str>"(?:[^"\\]|\\.)*")'
    r"|(?P<word>[^\s()=!:<>~\"]+))")


def tokenize_filter(text):
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = FILTER_TOKEN_RE.match(text, pos)
        if not m or m.end() == pos:
            raise FilterError(f"unexpected character at {pos}")
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


def parse_filter(text):
    """A list of predicates over an instance resource, all of which must hold (AND)."""
    tokens = tokenize_filter(text or "")
    preds, i, want_term = [], 0, True

    def take(kinds):
        nonlocal i
        if i >= len(tokens) or tokens[i][0] not in kinds:
            raise FilterError("incomplete expression")
        i += 1
        return tokens[i - 1]

    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "word" and value == "AND" and not want_term:
            want_term = True
            i += 1
            continue
        if kind == "word" and value in ("OR", "NOT"):
            raise FilterError(f"'{value}' is not supported")
        if not want_term:
            want_term = True  # juxtaposed terms are ANDed
        paren = kind == "lp"
        if paren:
            i += 1
        _, field = take(("word",))
        if i < len(tokens) and tokens[i] == ("word", "eq") or i < len(tokens) and tokens[i] == ("word", "ne"):
            raise FilterError("the regular-expression dialect (eq/ne) is not supported")
        _, op = take(("op",))
        vkind, raw = take(("str", "word"))
        literal = json.loads(raw) if vkind == "str" else raw
        if paren:
            take(("rp",))
        preds.append(make_predicate(field, op, literal, quoted=vkind == "str"))
        want_term = False
    if want_term and preds:
        raise FilterError("dangling AND")
    return preds


def make_predicate(field, op, literal, quoted):
    if op not in ("=", "!=", ":"):
        raise FilterError(f"operator '{op}' is not supported")
    if op == ":" and not (field.startswith("labels.") and literal == "*" and not quoted):
        raise FilterError("':' is supported only as labels.KEY:*")
    if op != ":" and "*" in literal:
        raise FilterError("wildcards are not supported")
    negate = op == "!="
    if field.startswith("labels."):
        key = field[len("labels."):]
        if not re.fullmatch(r"[a-z0-9_-]+", key):
            raise FilterError(f"bad label key '{key}'")
        if op == ":":
            return lambda r: key in r.get("labels", {})
        return lambda r: (r.get("labels", {}).get(key) == literal) != negate
    if field == "status":
        if literal not in INSTANCE_STATUSES:
            raise FilterError(f"unknown status '{literal}'")
        return lambda r: (r["status"] == literal) != negate
    if field == "name":
        return lambda r: (r["name"] == literal) != negate
    raise FilterError(f"field '{field}' is not supported")


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------

class Instance:
    def __init__(self, project, zone, data, vcpus):
        self.project, self.zone, self.data, self.vcpus = project, zone, data, vcpus
        self.region = ZONES[zone]
        self.pending = {}  # fingerprint kind -> fingerprint of a change not yet applied
        self.deleting = False


class Operation:
    """An operation that runs PENDING -> RUNNING -> DONE over wall time."""

    def __init__(self, data, project, scope, created, stage_s):
        self.data, self.project, self.scope = data, project, scope
        self.created, self.stage_s = created, stage_s
        self.on_running = None
        self.on_done = None  # returns None or an error (see Backend._op_error)


class Backend:
    """All fake state, behind one lock. Handlers return (status, body)."""

    def __init__(self, seed=None, stage_ms=150):
        self.lock = threading.RLock()
        self.seed = seed
        self.default_stage_ms = stage_ms
        self.reset()

    # -- lifecycle and control -------------------------------------------

    def reset(self):
        with self.lock:
            self.rng = random.Random(self.seed)
            self.fault_rng = random.Random(self.seed)
            self.config = {
                "stage_ms": self.default_stage_ms,
                "wait_ms": WAIT_MS,
                "default_cpu_quota": DEFAULT_CPU_QUOTA,
                "cpu_quota": {},
                "exhausted_zones": [],
                "faults": {"rate": 0.0, "kinds": list(FAULT_KINDS), "seed": self.seed,
                           "methods": list(FAULT_METHODS)},
            }
            self.projects = {}
            self.project_pending = {}  # project -> fingerprint of a metadata change not yet applied
            self.instances = {}  # (project, zone, name) -> Instance
            self.operations = {}  # (project, scope, name) -> Operation
            self.running = []  # operations not DONE, oldest first
            self.request_ids = {}  # (project, requestId) -> Operation
            self.counts = {}
            self.next_ip = {}

    def configure(self, update):
        if not isinstance(update, dict):
            raise ValueError("config must be a JSON object")
        with self.lock:
            cfg = copy.deepcopy(self.config)
            for key, value in update.items():
                if key in ("stage_ms", "wait_ms", "default_cpu_quota"):
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                        raise ValueError(f"{key} must be a number >= 0")
                    cfg[key] = value
                elif key == "cpu_quota":
                    if not isinstance(value, dict):
                        raise ValueError("cpu_quota must map region -> vCPUs")
                    for region, limit in value.items():
                        if region not in REGIONS:
                            raise ValueError(f"unknown region {region!r}; known: {REGIONS}")
                        if limit is None:
                            cfg["cpu_quota"].pop(region, None)
                        elif isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit < 0:
                            raise ValueError(f"cpu_quota[{region}] must be a number >= 0 or null")
                        else:
                            cfg["cpu_quota"][region] = limit
                elif key == "exhausted_zones":
                    if not isinstance(value, list) or any(z not in ZONES for z in value):
                        raise ValueError(f"exhausted_zones must list known zones: {sorted(ZONES)}")
                    cfg["exhausted_zones"] = list(value)
                elif key == "faults":
                    cfg["faults"] = self._configure_faults(cfg["faults"], value)
                else:
                    raise ValueError(f"unknown config key {key!r}")
            self.config = cfg
            return copy.deepcopy(cfg)

    def _configure_faults(self, faults, value):
        if not isinstance(value, dict):
            raise ValueError("faults must be an object")
        faults = dict(faults)
        for key, v in value.items():
            if key == "rate":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                    raise ValueError("faults.rate must be within [0, 1]")
                faults["rate"] = v
            elif key == "kinds":
                if not isinstance(v, list) or not v or any(k not in FAULT_KINDS for k in v):
                    raise ValueError(f"faults.kinds must be a non-empty subset of {list(FAULT_KINDS)}")
                faults["kinds"] = list(v)
            elif key == "methods":
                if not isinstance(v, list) or any(m not in FAULT_METHODS for m in v):
                    raise ValueError(f"faults.methods must be a subset of {list(FAULT_METHODS)}")
                faults["methods"] = list(v)
            elif key == "seed":
                if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                    raise ValueError("faults.seed must be an integer or null")
                faults["seed"] = v
                self.fault_rng = random.Random(v)
            else:
                raise ValueError(f"unknown faults key {key!r}")
        return faults

    def count(self, method, template):
        with self.lock:
            key = f"{method} {template}"
            self.counts[key] = self.counts.get(key, 0) + 1

    def pick_fault(self, method):
        with self.lock:
            faults = self.config["faults"]
            if faults["rate"] <= 0 or method not in faults["methods"]:
                return None
            if self.fault_rng.random() >= faults["rate"]:
                return None
            return self.fault_rng.choice(faults["kinds"])

    def snapshot_instances(self):
        with self.lock:
            self._advance()
            out = []
            for inst in sorted(self.instances.values(), key=lambda i: (i.project, i.zone, i.data["name"])):
                d = inst.data
                nic = d["networkInterfaces"][0]
                access = nic.get("accessConfigs") or [{}]
                out.append({
                    "project": inst.project, "zone": inst.zone, "name": d["name"], "id": d["id"],
                    "status": d["status"], "machineType": bare_type(d["machineType"]),
                    "labels": dict(d.get("labels", {})),
                    "metadata": {item["key"]: item["value"] for item in d["metadata"].get("items", [])},
                    "networkIP": nic["networkIP"], "natIP": access[0].get("natIP"),
                    "scheduling": dict(d["scheduling"]),
                })
            return {"instances": out}

    # -- small generators ---------------------------------------------------

    def _new_id(self):
        return str(self.rng.randrange(10**18, 10**19))

    def _fingerprint(self):
        # URL-safe base64, as the real API sends fingerprints (abdolence/gcloud-sdk-rs#191
        # quotes "--KE24GB4T0="), and as Google's Rust client insists on reading them.
        return base64.urlsafe_b64encode(self.rng.randbytes(8)).decode()

    def _operation_name(self, t):
        return (f"operation-{int(t * 1000)}-{self.rng.getrandbits(52):013x}-"
                f"{self.rng.getrandbits(32):08x}-{self.rng.getrandbits(32):08x}")

    def _private_ip(self, project, network):
        n = self.next_ip.get((project, network), 2)
        while n % 256 in (0, 1, 255):
            n += 1
        self.next_ip[(project, network)] = n + 1
        return f"10.128.{n // 256}.{n % 256}"

    def _nat_ip(self):
        return f"34.{self.rng.randrange(16, 255)}.{self.rng.randrange(0, 256)}.{self.rng.randrange(1, 255)}"

    # -- operations -----------------------------------------------------------

    def _advance(self, now=None):
        """Moves every operation along to where wall time says it is."""
        now = time.time() if now is None else now
        still = []
        for op in self.running:
            if op.data["status"] == "PENDING" and now >= op.created + op.stage_s:
                op.data["status"] = "RUNNING"
                op.data["startTime"] = rfc3339(op.created + op.stage_s)
                op.data["progress"] = 0
                if op.on_running:
                    op.on_running()
            if op.data["status"] == "RUNNING" and now >= op.created + 2 * op.stage_s:
                error = op.on_done() if op.on_done else None
                op.data["status"] = "DONE"
                op.data["progress"] = 100
                op.data["endTime"] = rfc3339(op.created + 2 * op.stage_s)
                if error:
                    op.data.update(error)
                continue
            still.append(op)
        self.running = still

    def _new_operation(self, project, scope, op_type, target_link=None, target_id=None,
                       request_id=None, group_id=None):
        t = time.time()
        name = self._operation_name(t)
        data = {"kind": "compute#operation", "id": self._new_id(), "name": name,
                "operationType": op_type, "status": "PENDING", "user": "fake-caller@example.com",
                "progress": 0, "insertTime": rfc3339(t)}
        if target_link:
            data["targetLink"] = target_link
        if target_id:
            data["targetId"] = target_id
        if request_id:
            data["clientOperationId"] = request_id
        if group_id:
            data["operationGroupId"] = group_id
        if scope == "global":
            data["selfLink"] = f"{project_url(project)}/global/operations/{name}"
        else:
            zone = scope.split("/", 1)[1]
            data["zone"] = zone_url(project, zone)
            data["selfLink"] = f"{zone_url(project, zone)}/operations/{name}"
        op = Operation(data, project, scope, t, self.config["stage_ms"] / 1000.0)
        self.operations[(project, scope, name)] = op
        self.running.append(op)
        if request_id:
            self.request_ids[(project, request_id)] = op
        return op

    @staticmethod
    def _op_error(code, message, http_status, http_message, details=None):
        item = {"code": code, "message": message}
        if details:
            item["errorDetails"] = details
        return {"error": {"errors": [item]}, "httpErrorStatusCode": http_status,
                "httpErrorMessage": http_message}

    def _replayed(self, project, request_id):
        op = self.request_ids.get((project, request_id)) if request_id else None
        return (200, copy.deepcopy(op.data)) if op else None

    def get_operation(self, project, scope, name):
        with self.lock:
            self._project(project)
            if scope != "global":
                self._zone(scope.split("/", 1)[1])
            self._advance()
            op = self.operations.get((project, scope, name))
            if not op:
                raise not_found(f"projects/{project}/{scope}/operations/{name}")
            return 200, copy.deepcopy(op.data)

    def wait_operation(self, project, scope, name):
        deadline = time.time() + self.config["wait_ms"] / 1000.0
        while True:
            status, data = self.get_operation(project, scope, name)
            if data["status"] == "DONE" or time.time() >= deadline:
                return status, data
            time.sleep(0.01)

    # -- admission: quota and capacity ------------------------------------------

    def _cpu_limit(self, region):
        return self.config["cpu_quota"].get(region, self.config["default_cpu_quota"])

    def _cpus_in_use(self, project, region):
        return sum(i.vcpus for i in self.instances.values()
                   if i.project == project and i.region == region and i.data["status"] != "TERMINATED")

    def _quota_error(self, region):
        limit = float(self._cpu_limit(region))
        return self._op_error(
            "QUOTA_EXCEEDED", f"Quota 'CPUS' exceeded.  Limit: {limit} in region {region}.", 403, "FORBIDDEN",
            [{"quotaInfo": {"metricName": "compute.googleapis.com/cpus", "limitName": "CPUS-per-project-region",
                            "dimensions": {"region": region}, "limit": limit}}])

    def _capacity_error(self, project, zone, machine_type):
        return self._op_error(
            "ZONE_RESOURCE_POOL_EXHAUSTED",
            f"The zone 'projects/{project}/zones/{zone}' does not have enough resources available to fulfill "
            "the request.  Try a different zone, or try again later.", 503, "SERVICE UNAVAILABLE",
            [{"help": {"links": [{"description": "Troubleshooting documentation",
                                  "url": "https://cloud.google.com/compute/docs/resource-error"}]}},
             {"localizedMessage": {"locale": "en-US",
                                   "message": f"A {machine_type} VM instance is currently unavailable in the "
                                              f"{zone} zone. Alternatively, you can try your request again "
                                              "with a different VM hardware configuration or at a later time. "
                                              "For more information, see the troubleshooting documentation."}},
             {"errorInfo": {"domain": "compute.googleapis.com", "reason": "resource_availability",
                            "metadatas": {"vmType": machine_type, "zone": zone, "zonesAvailable": "",
                                          "attachment": ""}}}])

    def _how_many_fit(self, project, zone, vcpus_each, wanted):
        """How many of `wanted` instances fit the region's CPUS quota."""
        region = ZONES[zone]
        free = self._cpu_limit(region) - self._cpus_in_use(project, region)
        return max(0, min(wanted, int(free // vcpus_each)))

    # -- lookups -----------------------------------------------------------------

    def _project(self, project):
        if not PROJECT_RE.fullmatch(project):
            raise invalid("project", project, f"Must be a match of regex '{PROJECT_PATTERN}'")
        if project not in self.projects:
            t = time.time()
            number = project_number(project)
            self.projects[project] = {
                "kind": "compute#project", "id": self._new_id(), "creationTimestamp": rfc3339(t),
                "name": project,
                "commonInstanceMetadata": {"kind": "compute#metadata", "fingerprint": self._fingerprint()},
                "selfLink": project_url(project),
                "defaultServiceAccount": f"{number}-compute@developer.gserviceaccount.com",
                "xpnProjectStatus": "UNSPECIFIED_XPN_PROJECT_STATUS", "defaultNetworkTier": "PREMIUM",
                "vmDnsSetting": "ZONAL_ONLY",
            }
        return self.projects[project]

    @staticmethod
    def _zone(zone):
        if zone not in ZONES:
            raise invalid("zone", zone, "Unknown zone.")

    def _instance(self, project, zone, name):
        inst = self.instances.get((project, zone, name))
        if not inst:
            raise not_found(f"projects/{project}/zones/{zone}/instances/{name}")
        return inst

    def _enter(self, project, zone=None):
        """Common start of every API call: validate scope, move time along."""
        self._project(project)
        if zone is not None:
            self._zone(zone)
        self._advance()

    # -- instances: reads -----------------------------------------------------------

    def get_instance(self, project, zone, name):
        with self.lock:
            self._enter(project, zone)
            return 200, copy.deepcopy(self._instance(project, zone, name).data)

    def _listing(self, query, instances, scope_id):
        preds = self._parse_filter(query.get("filter"))
        max_results = self._max_results(query.get("maxResults"))
        order = query.get("orderBy")
        if order not in (None, "", "name", "creationTimestamp desc"):
            raise invalid("orderBy", order, "Only 'name' and 'creationTimestamp desc' are supported.")
        rows = [i for i in instances if all(p(i.data) for p in preds)]
        if order == "creationTimestamp desc":
            rows.sort(key=lambda i: i.data["creationTimestamp"], reverse=True)
        else:
            rows.sort(key=lambda i: (i.zone, i.data["name"]))
        token_key = json.dumps([scope_id, query.get("filter") or "", order or ""])
        offset = self._page_offset(query.get("pageToken"), token_key)
        page = rows[offset:offset + max_results]
        next_token = None
        if offset + max_results < len(rows):
            next_token = self._page_token(offset + max_results, token_key)
        return page, next_token

    def list_instances(self, project, zone, query):
        with self.lock:
            self._enter(project, zone)
            scope = [i for i in self.instances.values() if i.project == project and i.zone == zone]
            page, token = self._listing(query, scope, f"{project}/{zone}")
            body = {"kind": "compute#instanceList", "id": f"projects/{project}/zones/{zone}/instances",
                    "selfLink": f"{zone_url(project, zone)}/instances"}
            if page:
                body["items"] = [copy.deepcopy(i.data) for i in page]
            if token:
                body["nextPageToken"] = token
            return 200, body

    def aggregated_instances(self, project, query):
        with self.lock:
            self._enter(project)
            for flag in ("returnPartialSuccess", "includeAllScopes"):
                if query.get(flag) not in (None, "true", "false"):
                    raise bad_payload(f"Invalid value at '{flag}' (TYPE_BOOL), \"{query[flag]}\"")
            scope = [i for i in self.instances.values() if i.project == project]
            page, token = self._listing(query, scope, f"{project}/aggregated")
            items = {}
            for zone in sorted(ZONES):
                found = [copy.deepcopy(i.data) for i in page if i.zone == zone]
                if found:
                    items[f"zones/{zone}"] = {"instances": found}
                else:
                    items[f"zones/{zone}"] = {"warning": {
                        "code": "NO_RESULTS_ON_PAGE",
                        "message": "There are no results for scope 'zones/%s' on this page." % zone,
                        "data": [{"key": "scope", "value": f"zones/{zone}"}]}}
            body = {"kind": "compute#instanceAggregatedList", "id": f"projects/{project}/aggregated/instances",
                    "items": items, "selfLink": f"{project_url(project)}/aggregated/instances"}
            if token:
                body["nextPageToken"] = token
            return 200, body

    @staticmethod
    def _parse_filter(text):
        try:
            return parse_filter(text)
        except FilterError as e:
            raise invalid("filter", text, f"Invalid list filter expression. (fake_gce: {e})") from None

    @staticmethod
    def _max_results(raw):
        if raw is None or raw == "":
            return 500
        if not re.fullmatch(r"[0-9]+", raw):
            raise bad_payload(f"Invalid value at 'max_results' (TYPE_UINT32), \"{raw}\"")
        value = int(raw)
        if value > 500:
            raise invalid("maxResults", raw, "Must be less than or equal to 500")
        return value or 500

    def _page_token(self, offset, key):
        raw = json.dumps({"o": offset, "k": key, "n": self.rng.getrandbits(32)}).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def _page_offset(token, key):
        if not token:
            return 0
        try:
            raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
            if raw["k"] != key or not isinstance(raw["o"], int) or raw["o"] < 0:
                raise ValueError
            return raw["o"]
        except (ValueError, KeyError, TypeError):
            raise invalid("pageToken", token, "Invalid page token.") from None

    # -- instances: creation ----------------------------------------------------------

    def _build_instance(self, project, zone, name, spec):
        """The instance resource as the API shows it, PROVISIONING."""
        t = time.time()
        disks = []
        for disk in copy.deepcopy(spec.disks):
            disk_name = disk.pop("_diskName") or (name if disk["boot"] else f"{name}-disk-{disk['index']}")
            disk["source"] = f"{zone_url(project, zone)}/disks/{disk_name}"
            for key in ("licenses", "guestOsFeatures"):
                if not disk[key]:
                    del disk[key]
            disks.append(disk)
        nics = []
        for i, nic in enumerate(spec.nics):
            out = {"kind": "compute#networkInterface", "network": nic["network"],
                   "subnetwork": nic["subnetwork"],
                   "networkIP": nic["networkIP"] or self._private_ip(project, nic["network"]),
                   "name": f"nic{i}", "fingerprint": self._fingerprint(), "stackType": "IPV4_ONLY"}
            if nic["accessConfigs"]:
                out["accessConfigs"] = [dict(ac, natIP=ac["natIP"] or self._nat_ip()) for ac in nic["accessConfigs"]]
            nics.append(out)
        metadata = {"kind": "compute#metadata", "fingerprint": self._fingerprint()}
        if spec.metadata:
            metadata["items"] = copy.deepcopy(spec.metadata)
        data = {
            "kind": "compute#instance", "id": self._new_id(), "creationTimestamp": rfc3339(t),
            "name": name,
            "tags": {"fingerprint": self._fingerprint()},
            "machineType": f"{zone_url(project, zone)}/machineTypes/{spec.machine_type}",
            "status": "PROVISIONING", "zone": zone_url(project, zone), "canIpForward": spec.can_ip_forward,
            "networkInterfaces": nics, "disks": disks, "metadata": metadata,
            "selfLink": instance_url(project, zone, name),
            "scheduling": copy.deepcopy(spec.scheduling),
            "cpuPlatform": "Unknown CPU Platform",
            "labelFingerprint": self._fingerprint(),
            "startRestricted": False, "deletionProtection": spec.deletion_protection,
            "shieldedInstanceConfig": {"enableSecureBoot": False, "enableVtpm": True,
                                       "enableIntegrityMonitoring": True},
            "shieldedInstanceIntegrityPolicy": {"updateAutoLearnPolicy": True},
            "fingerprint": self._fingerprint(),
            "satisfiesPzi": True,
        }
        if spec.description is not None:
            data["description"] = spec.description
        if spec.tags:
            data["tags"]["items"] = list(spec.tags)
        if spec.labels:
            data["labels"] = dict(spec.labels)
        if spec.service_accounts:
            data["serviceAccounts"] = copy.deepcopy(spec.service_accounts)
        return Instance(project, zone, data, spec.vcpus)

    def _launch(self, inst, op):
        """Stores a PROVISIONING instance; it becomes STAGING then RUNNING with its operation."""
        self.instances[(inst.project, inst.zone, inst.data["name"])] = inst
        family = inst.data["machineType"].rsplit("/", 1)[-1].split("-", 1)[0]

        def running():
            if inst.data["status"] == "PROVISIONING":
                inst.data["status"] = "STAGING"

        def done():
            if inst.data["status"] in ("PROVISIONING", "STAGING"):
                inst.data["status"] = "RUNNING"
                inst.data["cpuPlatform"] = CPU_PLATFORMS.get(family, "Intel Broadwell")
                inst.data["lastStartTimestamp"] = rfc3339(time.time())
            return None

        op.on_running, op.on_done = running, done

    def insert_instance(self, project, zone, query, body):
        with self.lock:
            request_id = self._request_id(query)
            self._enter(project, zone)
            replay = self._replayed(project, request_id)
            if replay:
                return replay
            body = self._require_body(body)
            check_fields(body, INSTANCE_FIELDS, "resource")
            name = validate_name(body.get("name"), "resource.name")
            spec = InstanceSpec(project, zone, body, "resource", bulk=False)
            if (project, zone, name) in self.instances:
                raise ApiError(409, "alreadyExists",
                               f"The resource 'projects/{project}/zones/{zone}/instances/{name}' already exists")
            fit, error = self._admit(project, zone, spec, 1, 1)
            inst = self._build_instance(project, zone, name, spec)
            op = self._new_operation(project, f"zones/{zone}", "insert", inst.data["selfLink"], inst.data["id"],
                                     request_id)
            if error:
                op.on_done = lambda: error  # nothing is created
            else:
                self._launch(inst, op)
            return 200, copy.deepcopy(op.data)

    def _admit(self, project, zone, spec, wanted, min_count):
        """How many of `wanted` instances may launch now, or the error their operation ends with.

        Quota is checked first (vCPUs of every instance that is not TERMINATED
        count), then capacity; fewer than min_count launching means none do.
        """
        fit = self._how_many_fit(project, zone, spec.vcpus, wanted)
        if fit < min_count:
            return 0, self._quota_error(ZONES[zone])
        if zone in self.config["exhausted_zones"]:
            return 0, self._capacity_error(project, zone, spec.machine_type)
        return fit, None

    def bulk_insert(self, project, zone, query, body):
        with self.lock:
            request_id = self._request_id(query)
            self._enter(project, zone)
            replay = self._replayed(project, request_id)
            if replay:
                return replay
            body = self._require_body(body)
            check_fields(body, BULK_FIELDS, "resource")
            count, min_count, names = self._bulk_names(project, zone, body)
            if body.get("sourceInstanceTemplate"):
                raise unsupported("resource.sourceInstanceTemplate", body["sourceInstanceTemplate"],
                                  "Instance templates")
            props = body.get("instanceProperties")
            if props is None:
                raise required("resource.instanceProperties")
            check_fields(props, INSTANCE_PROPERTIES_FIELDS, "resource.instanceProperties")
            machine_type = props.get("machineType")
            url_type = isinstance(machine_type, str) and "/" in machine_type
            spec = None if url_type else InstanceSpec(project, zone, props, "resource.instanceProperties", bulk=True)
            group_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
            op = self._new_operation(project, f"zones/{zone}", "bulkInsert", request_id=request_id,
                                     group_id=group_id)
            status = {"targetVmCount": count, "createdVmCount": 0, "failedToCreateVmCount": 0,
                      "deletedVmCount": 0, "status": "CREATING"}
            op.data["instancesBulkInsertOperationMetadata"] = {"perLocationStatus": {f"zones/{zone}": status}}
            if url_type:
                # The discovery document: instanceProperties.machineType takes a bare name only;
                # a URL "will result in an INTERNAL_ERROR".
                error = self._op_error("INTERNAL_ERROR", "Internal error. Please try again or contact Google "
                                       "Support. (Code: '-1010451287417146442')", 500, "INTERNAL SERVER ERROR")
                op.on_done = self._bulk_finisher(status, [], count, error)
                return 200, copy.deepcopy(op.data)
            fit, error = self._admit(project, zone, spec, count, min_count)
            launched = []
            for name in names[:fit]:
                inst = self._build_instance(project, zone, name, spec)
                child = self._new_operation(project, f"zones/{zone}", "insert", inst.data["selfLink"],
                                            inst.data["id"], group_id=group_id)
                self._launch(inst, child)
                launched.append(inst)
            op.on_done = self._bulk_finisher(status, launched, count, error)
            return 200, copy.deepcopy(op.data)

    @staticmethod
    def _bulk_finisher(status, launched, count, error):
        def done():
            status["createdVmCount"] = len(launched)
            status["failedToCreateVmCount"] = count - len(launched)
            status["status"] = "DONE"
            return error
        return done

    def _bulk_names(self, project, zone, body):
        count = body.get("count")
        if count is None:
            raise required("resource.count")
        count = parse_int64(count, "resource.count")
        if count < 1:
            raise invalid("resource.count", str(count), "Must be greater than or equal to 1")
        min_count = parse_int64(body.get("minCount", count), "resource.minCount")
        if not 1 <= min_count <= count:
            raise invalid("resource.minCount", str(min_count), "Must be between 1 and count.")
        per_instance = body.get("perInstanceProperties") or {}
        if not isinstance(per_instance, dict):
            raise wrong_type("resource.perInstanceProperties", "TYPE_MESSAGE", per_instance)
        pattern = body.get("namePattern")
        if not per_instance and not pattern:
            raise invalid("resource", "", "Either namePattern or perInstanceProperties must be set.")
        if len(per_instance) > count:
            raise invalid("resource.count", str(count), "Must be at least the number of perInstanceProperties.")
        names = []
        for name, props in per_instance.items():
            check_fields(props or {}, PER_INSTANCE_FIELDS, f"resource.perInstanceProperties[{name}]")
            validate_name(name, "resource.perInstanceProperties")
            if (project, zone, name) in self.instances:
                raise ApiError(409, "alreadyExists",
                               f"The resource 'projects/{project}/zones/{zone}/instances/{name}' already exists")
            names.append(name)
        if len(names) < count:
            if not pattern:
                raise invalid("resource.namePattern", "", "namePattern must be set when count exceeds the "
                              "number of perInstanceProperties.")
            names += self._pattern_names(project, zone, pattern, count - len(names), set(names))
        return count, min_count, names

    def _pattern_names(self, project, zone, pattern, wanted, taken):
        runs = re.findall(r"#+", pattern)
        if len(runs) != 1 or len(runs[0]) > 18:
            raise invalid("resource.namePattern", pattern,
                          "The pattern must contain one continuous sequence of at most 18 '#' characters.")
        width = len(runs[0])
        head, tail = pattern.split(runs[0])
        rx = re.compile(re.escape(head) + r"([0-9]{%d})" % width + re.escape(tail))
        biggest = 0
        for (p, z, n) in self.instances:
            m = rx.fullmatch(n) if (p, z) == (project, zone) else None
            if m:
                biggest = max(biggest, int(m.group(1)))
        names, number = [], biggest
        while len(names) < wanted:
            number += 1
            if len(str(number)) > width:
                raise invalid("resource.namePattern", pattern, "The name pattern has run out of numbers.")
            name = f"{head}{number:0{width}d}{tail}"
            validate_name(name, "resource.namePattern")
            if name not in taken:
                names.append(name)
        return names

    # -- instances: changes ---------------------------------------------------------------

    def delete_instance(self, project, zone, name, query):
        with self.lock:
            request_id = self._request_id(query)
            self._enter(project, zone)
            replay = self._replayed(project, request_id)
            if replay:
                return replay
            inst = self._instance(project, zone, name)
            if inst.data["deletionProtection"]:
                raise ApiError(400, "invalidResourceUsage",
                               "Invalid resource usage: 'Resource cannot be deleted if it's protected against "
                               "deletion.'.")
            op = self._new_operation(project, f"zones/{zone}", "delete", inst.data["selfLink"], inst.data["id"],
                                     request_id)
            if not inst.deleting:
                inst.deleting = True
                inst.data["status"] = "STOPPING"

                def done():
                    self.instances.pop((project, zone, name), None)
                op.on_done = done
            return 200, copy.deepcopy(op.data)

    def stop_instance(self, project, zone, name, query):
        with self.lock:
            request_id = self._request_id(query)
            self._enter(project, zone)
            replay = self._replayed(project, request_id)
            if replay:
                return replay
            inst = self._instance(project, zone, name)
            op = self._new_operation(project, f"zones/{zone}", "stop", inst.data["selfLink"], inst.data["id"],
                                     request_id)
            if inst.data["status"] in ("PROVISIONING", "STAGING", "RUNNING") and not inst.deleting:
                inst.data["status"] = "STOPPING"

                def done():
                    if inst.data["status"] == "STOPPING" and not inst.deleting:
                        inst.data["status"] = "TERMINATED"
                        inst.data["lastStopTimestamp"] = rfc3339(time.time())
                op.on_done = done
            return 200, copy.deepcopy(op.data)

    def start_instance(self, project, zone, name, query):
        with self.lock:
            request_id = self._request_id(query)
            self._enter(project, zone)
            replay = self._replayed(project, request_id)
            if replay:
                return replay
            inst = self._instance(project, zone, name)
            if inst.data["status"] == "STOPPING":
                raise ApiError(400, "resourceNotReady",
                               f"The resource 'projects/{project}/zones/{zone}/instances/{name}' is not ready")
            op = self._new_operation(project, f"zones/{zone}", "start", inst.data["selfLink"], inst.data["id"],
                                     request_id)
            if inst.data["status"] != "TERMINATED":
                return 200, copy.deepcopy(op.data)
            if self._how_many_fit(project, zone, inst.vcpus, 1) < 1:
                error = self._quota_error(inst.region)
                op.on_done = lambda: error
            elif zone in self.config["exhausted_zones"]:
                error = self._capacity_error(project, zone, bare_type(inst.data["machineType"]))
                op.on_done = lambda: error
            else:
                inst.data["status"] = "STAGING"

                def done():
                    if inst.data["status"] == "STAGING":
                        inst.data["status"] = "RUNNING"
                        inst.data["lastStartTimestamp"] = rfc3339(time.time())
                op.on_done = done
            return 200, copy.deepcopy(op.data)

    def _check_fingerprint(self, given, current, message, header_location):
        if given is None or given != current:
            if header_location:
                raise ApiError(412, "conditionNotMet", message, location="If-Match", location_type="header")
            raise ApiError(412, "conditionNotMet", message)

    def set_labels(self, project, zone, name, query, body):
        with self.lock:
            request_id = self._request_id(query)
            self._enter(project, zone)
            replay = self._replayed(project, request_id)
            if replay:
                return replay
            body = self._require_body(body)
            check_fields(body, SET_LABELS_FIELDS, "resource")
            inst = self._instance(project, zone, name)
            labels = validate_labels(body.get("labels"), "labels")
            current = inst.pending.get("labels", inst.data["labelFingerprint"])
            self._check_fingerprint(body.get("labelFingerprint"), current,
                                    "Labels fingerprint either invalid or resource labels have changed", True)
            new_fp = inst.pending["labels"] = self._fingerprint()
            op = self._new_operation(project, f"zones/{zone}", "setLabels", inst.data["selfLink"],
                                     inst.data["id"], request_id)

            def done():
                if labels:
                    inst.data["labels"] = labels
                else:
                    inst.data.pop("labels", None)
                inst.data["labelFingerprint"] = new_fp
                if inst.pending.get("labels") == new_fp:
                    del inst.pending["labels"]
            op.on_done = done
            return 200, copy.deepcopy(op.data)

    def set_metadata(self, project, zone, name, query, body):
        with self.lock:
            request_id = self._request_id(query)
            self._enter(project, zone)
            replay = self._replayed(project, request_id)
            if replay:
                return replay
            body = self._require_body(body)
            check_fields(body, METADATA_FIELDS, "resource")
            inst = self._instance(project, zone, name)
            items = validate_metadata_items(body.get("items"), "metadata")
            current = inst.pending.get("metadata", inst.data["metadata"]["fingerprint"])
            self._check_fingerprint(body.get("fingerprint"), current,
                                    "Supplied fingerprint does not match current metadata fingerprint.", False)
            new_fp = inst.pending["metadata"] = self._fingerprint()
            op = self._new_operation(project, f"zones/{zone}", "setMetadata", inst.data["selfLink"],
                                     inst.data["id"], request_id)

            def done():
                inst.data["metadata"] = {"kind": "compute#metadata", "fingerprint": new_fp}
                if items:
                    inst.data["metadata"]["items"] = items
                if inst.pending.get("metadata") == new_fp:
                    del inst.pending["metadata"]
            op.on_done = done
            return 200, copy.deepcopy(op.data)

    # -- projects -------------------------------------------------------------------------

    def get_project(self, project):
        with self.lock:
            self._enter(project)
            return 200, copy.deepcopy(self.projects[project])

    def set_common_metadata(self, project, query, body):
        with self.lock:
            request_id = self._request_id(query)
            self._enter(project)
            replay = self._replayed(project, request_id)
            if replay:
                return replay
            body = self._require_body(body)
            check_fields(body, METADATA_FIELDS, "resource")
            proj = self.projects[project]
            items = validate_metadata_items(body.get("items"), "resource")
            current = self.project_pending.get(project, proj["commonInstanceMetadata"]["fingerprint"])
            self._check_fingerprint(body.get("fingerprint"), current,
                                    "Supplied fingerprint does not match current metadata fingerprint.", False)
            new_fp = self.project_pending[project] = self._fingerprint()
            op = self._new_operation(project, "global", "setCommonInstanceMetadata", proj["selfLink"], proj["id"],
                                     request_id)

            def done():
                proj["commonInstanceMetadata"] = {"kind": "compute#metadata", "fingerprint": new_fp}
                if items:
                    proj["commonInstanceMetadata"]["items"] = items
                if self.project_pending.get(project) == new_fp:
                    del self.project_pending[project]
            op.on_done = done
            return 200, copy.deepcopy(op.data)

    # -- request helpers ---------------------------------------------------------------------

    @staticmethod
    def _request_id(query):
        rid = query.get("requestId")
        if rid is None:
            return None
        try:
            parsed = uuid.UUID(rid)
        except ValueError:
            parsed = None
        if parsed is None or parsed.int == 0 or str(parsed) != rid.lower():
            raise invalid("requestId", rid, "The request ID must be a valid UUID with the exception that zero "
                          "UUID is not supported (00000000-0000-0000-0000-000000000000).")
        return rid

    @staticmethod
    def _require_body(body):
        if body is None:
            raise required("resource")
        return body


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

P = r"(?P<project>[^/]+)"
Z = r"(?P<zone>[^/]+)"
N = r"(?P<name>[^/]+)"
O = r"(?P<op>[^/]+)"
V1 = r"/compute/v1/projects/" + P

# (method, path regex, template for /_fake/requests, extra query params, backend call)
ROUTES = [
    ("GET", V1 + r"/aggregated/instances", "aggregated/instances", AGGREGATED_PARAMS,
     lambda b, m, q, body: b.aggregated_instances(m["project"], q)),
    ("GET", V1 + r"/zones/" + Z + r"/instances", "instances", LIST_PARAMS,
     lambda b, m, q, body: b.list_instances(m["project"], m["zone"], q)),
    ("POST", V1 + r"/zones/" + Z + r"/instances", "instances", MUTATION_PARAMS,
     lambda b, m, q, body: b.insert_instance(m["project"], m["zone"], q, body)),
    ("POST", V1 + r"/zones/" + Z + r"/instances/bulkInsert", "instances/bulkInsert", MUTATION_PARAMS,
     lambda b, m, q, body: b.bulk_insert(m["project"], m["zone"], q, body)),
    ("GET", V1 + r"/zones/" + Z + r"/instances/" + N, "instances/{instance}", set(),
     lambda b, m, q, body: b.get_instance(m["project"], m["zone"], m["name"])),
    ("DELETE", V1 + r"/zones/" + Z + r"/instances/" + N, "instances/{instance}", MUTATION_PARAMS,
     lambda b, m, q, body: b.delete_instance(m["project"], m["zone"], m["name"], q)),
    ("POST", V1 + r"/zones/" + Z + r"/instances/" + N + r"/stop", "instances/{instance}/stop",
     MUTATION_PARAMS | {"discardLocalSsd"},
     lambda b, m, q, body: b.stop_instance(m["project"], m["zone"], m["name"], q)),
    ("POST", V1 + r"/zones/" + Z + r"/instances/" + N + r"/start", "instances/{instance}/start", MUTATION_PARAMS,
     lambda b, m, q, body: b.start_instance(m["project"], m["zone"], m["name"], q)),
    ("POST", V1 + r"/zones/" + Z + r"/instances/" + N + r"/setLabels", "instances/{instance}/setLabels",
     MUTATION_PARAMS, lambda b, m, q, body: b.set_labels(m["project"], m["zone"], m["name"], q, body)),
    ("POST", V1 + r"/zones/" + Z + r"/instances/" + N + r"/setMetadata", "instances/{instance}/setMetadata",
     MUTATION_PARAMS, lambda b, m, q, body: b.set_metadata(m["project"], m["zone"], m["name"], q, body)),
    ("GET", V1 + r"/zones/" + Z + r"/operations/" + O, "zoneOperations/{operation}", set(),
     lambda b, m, q, body: b.get_operation(m["project"], "zones/" + m["zone"], m["op"])),
    ("POST", V1 + r"/zones/" + Z + r"/operations/" + O + r"/wait", "zoneOperations/{operation}/wait", set(),
     lambda b, m, q, body: b.wait_operation(m["project"], "zones/" + m["zone"], m["op"])),
    ("GET", V1 + r"/global/operations/" + O, "globalOperations/{operation}", set(),
     lambda b, m, q, body: b.get_operation(m["project"], "global", m["op"])),
    ("POST", V1 + r"/global/operations/" + O + r"/wait", "globalOperations/{operation}/wait", set(),
     lambda b, m, q, body: b.wait_operation(m["project"], "global", m["op"])),
    ("GET", V1, "projects/{project}", set(), lambda b, m, q, body: b.get_project(m["project"])),
    ("POST", V1 + r"/setCommonInstanceMetadata", "setCommonInstanceMetadata", MUTATION_PARAMS,
     lambda b, m, q, body: b.set_common_metadata(m["project"], q, body)),
]
ROUTES = [(method, re.compile(rx), template, params, call) for method, rx, template, params, call in ROUTES]


def match_route(method, path):
    for m_, rx, template, params, call in ROUTES:
        m = rx.fullmatch(path)
        if m and m_ == method:
            return template, params, call, {k: unquote(v) for k, v in m.groupdict().items()}
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-gce/1"

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def log_message(self, fmt, *args):
        if getattr(self.server, "verbose", False):
            sys.stderr.write("fake_gce: " + fmt % args + "\n")

    # -- plumbing -------------------------------------------------------------------

    def _read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status, payload):
        data = json.dumps(payload, indent=1).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _drop(self):
        """The 'lost' fault: the work is done, the answer never arrives."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- dispatch -------------------------------------------------------------------

    def _dispatch(self, method):
        backend = self.server.backend
        url = urlsplit(self.path)
        raw = self._read_body()
        if url.path.startswith("/_fake/"):
            status, payload = self._control(backend, method, url.path, raw)
            self._send(status, payload)
            return
        route = match_route(method, url.path)
        backend.count(method, route[0] if route else "unknown")
        fault = backend.pick_fault(method)
        if fault in ("429", "503"):
            project = (route[3].get("project") if route else None) or "unknown"
            error = rate_limited(project) if fault == "429" else backend_error()
            self._send(error.status, error.body)
            return
        try:
            status, payload = self._call(backend, route, url, raw)
        except ApiError as e:
            status, payload = e.status, e.body
        if fault == "lost":
            self._drop()
            return
        self._send(status, payload)

    def _call(self, backend, route, url, raw):
        if route is None:
            raise ApiError(404, "notFound", f"The requested URL {url.path} was not found on this server.")
        template, params, call, match = route
        query = {}
        for key, values in parse_qs(url.query, keep_blank_values=True).items():
            if key not in STANDARD_PARAMS and key not in params:
                raise bad_payload(f"Invalid JSON payload received. Unknown name \"{key}\": Cannot bind query "
                                  f"parameter. Field '{key}' could not be found in request message.")
            query[key] = values[0]
        body = None
        if raw.strip():
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise bad_payload("Invalid JSON payload received. Unexpected token.") from None
        return call(backend, match, query, body)

    def _control(self, backend, method, path, raw):
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return 400, {"error": "body is not JSON"}
        if (method, path) == ("GET", "/_fake/config"):
            return 200, copy.deepcopy(backend.config)
        if (method, path) == ("POST", "/_fake/config"):
            try:
                return 200, backend.configure(body)
            except ValueError as e:
                return 400, {"error": str(e)}
        if (method, path) == ("GET", "/_fake/requests"):
            with backend.lock:
                return 200, dict(sorted(backend.counts.items()))
        if (method, path) == ("POST", "/_fake/reset"):
            backend.reset()
            return 200, {"reset": True}
        if (method, path) == ("GET", "/_fake/instances"):
            return 200, backend.snapshot_instances()
        return 404, {"error": f"no control endpoint {method} {path}"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # parallel clients (bulk launches) must not meet a full backlog


class _Server6(_Server):
    address_family = socket.AF_INET6


class FakeGce:
    """The fake as an object, for tests: FakeGce().start(); .url; .backend; .stop()."""

    def __init__(self, host="127.0.0.1", port=0, seed=None, stage_ms=150, verbose=False):
        host = "127.0.0.1" if host == "localhost" else host
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"fake_gce binds loopback only, not {host}")
        self.host, self.port = host, port
        self.backend = Backend(seed=seed, stage_ms=stage_ms)
        self.verbose = verbose
        self.server = None
        self.thread = None
        self.url = None

    def start(self):
        cls = _Server6 if ":" in self.host else _Server
        self.server = cls((self.host, self.port), Handler)
        self.server.backend = self.backend
        self.server.verbose = self.verbose
        port = self.server.server_address[1]
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.1,), name="fake-gce", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)
            self.server = None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Stateful fake of the Compute Engine v1 REST API.")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port, 0 for any free one")
    parser.add_argument("--seed", type=int, default=None, help="seed for ids, fingerprints, IPs and faults")
    parser.add_argument("--stage-ms", type=int, default=150, help="time per operation stage (default 150)")
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    args = parser.parse_args(argv)
    try:
        fake = FakeGce(args.host, args.port, args.seed, args.stage_ms, args.verbose).start()
    except ValueError as e:
        parser.error(str(e))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"listening on {fake.url}", flush=True)
    while not stop.wait(0.1):
        pass
    fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
