#!/usr/bin/env python3
"""A stateful fake of Azure Resource Manager (the parts motorpool uses), for tests.

What it fakes (paths as the real API, matched case-insensitively as ARM does;
names keep the casing of the request that created them):

* Microsoft.Resources resource groups: PUT/GET/HEAD/DELETE
  /subscriptions/{sub}/resourcegroups/{rg}; DELETE is asynchronous (202 +
  Location .../operationresults/{id}) and takes every resource in the group.
* Microsoft.Compute/virtualMachines: PUT (create 201 / update 200), GET
  ($expand=instanceView|userData), GET .../instanceView, list per resource group
  (nextLink paging), PATCH, POST deallocate|start|powerOff|restart, DELETE; the
  Compute operation status resource .../locations/{loc}/operations/{id} (and the
  same URL with monitor=true, which is what the Location header points at).
* Microsoft.Network/networkInterfaces: PUT, GET, list per resource group, DELETE;
  the Network operation status resource and .../operationResults/{id}.
* Microsoft.Resources/templateSpecs and .../versions/{version}: PUT, GET, DELETE.

Responses use the shapes of the azure-rest-api-specs examples and of recorded
real traffic (see ../../testdata/README.md); errors use ARM's body
{"error": {"code", "message", "target"?, "details"?}}. Long-running operations
answer at once with provisioningState Creating/Updating/Deleting and an
Azure-AsyncOperation (and, for POST actions and DELETE, a Location) header; the
operation goes InProgress -> Succeeded|Failed over wall time (stage_ms per
stage; a VM create takes 2 stages, everything else 1) and the change takes
effect when it finishes.

What it refuses, as ARM does (a fake that accepts more hides bugs):

* a missing Authorization header (401 AuthenticationFailed), a token equal to
  config deny_token (403 AuthorizationFailed naming the action and scope);
* a missing api-version (400 MissingApiVersionParameter); an unsupported one:
  400 InvalidApiVersionParameter for resource groups (ARM itself), 400
  NoRegisteredProviderFound for provider resource types (the ARM router);
* resources in a missing resource group (404 ResourceGroupNotFound) or in one
  being deleted (409 ResourceGroupBeingDeleted); unknown locations;
* tags: more than 50, names over 512 or values over 256 characters, names with
  < > % & \\ ? / or control characters;
* VM bodies that Compute refuses: unknown vmSize, missing osProfile/networkProfile,
  disallowed admin usernames, Linux profiles without a usable authentication,
  SSH key paths other than /home/{user}/.ssh/authorized_keys, customData not in
  base64 or over 87380 characters, NICs that are missing, in another location,
  attached to another VM or still reserved for a deleted one, changes of
  properties that cannot change (409 PropertyChangeNotAllowed);
* a VM over the regional vCPU quota (synchronous 409 OperationNotAllowed), a size
  in config unavailable_sizes (synchronous 409 SkuNotAvailable); a size in
  config allocation_failures passes the request but its operation ends Failed
  with AllocationFailed and the VM stays, provisioningState Failed, until deleted;
* power actions that conflict with the VM's state (409 OperationNotAllowed);
* deleting a NIC attached to a VM (400 NicInUse) or reserved after its VM went
  (400 NicReservedForAnotherVm, for config nic_reservation_ms; Azure: 180 s);
* page tokens it did not issue (400).

Unknown JSON properties are ignored, as ARM resource providers do; unknown query
parameters are ignored. What it does not model it refuses with a 400 whose
message says "(not modelled by fake_arm)": Windows VMs, osDisk createOption
Attach/Empty, attaching existing managed disks, data disks, resizing, public IP
configurations inside networkInterfaceConfigurations, hibernation, PATCH of
NICs/resource groups/template specs. If-Match/If-None-Match are honoured on VM
PUT and PATCH only (ignored elsewhere).

Test control, not part of the real API, under /_fake/ (faults never apply there):

* POST /_fake/config  partial update, answers the whole config:
    {"stage_ms": 150,                    # time per operation stage
     "page_size": 50,                    # list page size (VMs, NICs)
     "default_core_quota": 1000,         # vCPUs per subscription and location
     "core_quota": {"westeurope": 10},   # per location; null drops it
     "spot_core_quota": {"westeurope": 4},  # Spot/Low VMs count here instead
     "unavailable_sizes": ["Standard_D2s_v5"],   # replaces the list
     "allocation_failures": ["Standard_D4s_v5"], # replaces the list
     "nic_reservation_ms": 0,            # how long a NIC stays reserved
     "deny_token": null,                 # bearer token that gets 403
     "retry_after": 1,                   # seconds in Retry-After (Azure: 10)
     "patch_async_header": false,        # VM PATCH answers Azure-AsyncOperation
     "strict_template_validation": true, # mainTemplate must look like a template
     "faults": {"rate": 0.2, "kinds": ["429", "503", "lost"], "seed": 1,
                "methods": ["GET", "PUT", "PATCH", "POST", "DELETE", "HEAD"]}}
  A bad key or value answers 400 {"error": "..."}.
* GET /_fake/config    the config.
* GET /_fake/requests  {"METHOD template": count}, e.g. "GET virtualMachines" (the
  list), "PUT virtualMachines/{name}", "GET operations/{id}"; faulted requests count.
* POST /_fake/reset    forgets everything: state, counts, config.
* GET /_fake/vms       {"vms": [{subscription, resourceGroup, name, id, location,
  vmSize, priority, provisioningState, powerState, tags, customData, userData
  (both decoded from base64), nicIds, privateIp, osDiskId, timeCreated}]}
* GET /_fake/nics      {"nics": [{subscription, resourceGroup, name, id, location,
  provisioningState, privateIp, attachedVm, reservedFor, reservedUntil, tags}]}
* GET /_fake/disks     {"disks": [{subscription, resourceGroup, name, id, vm,
  deleteOption, diskSizeGB, storageAccountType}]}

Faults: "429" answers 429 with Retry-After: 1 (Compute routes: Compute's
OperationNotAllowed/TooManyRequests body; others: ARM's
SubscriptionRequestsThrottled), "503" answers 503 ServiceUnavailable, both
without doing the work; "lost" does the work, then closes the connection
without an answer.

Run: python3 fake_arm.py --port 0 [--host 127.0.0.1] [--seed N] [--stage-ms MS]
It prints one line "listening on http://127.0.0.1:PORT" once ready and serves
until SIGTERM/SIGINT. Importable: FakeArm(port=0).start() ... .url ... .stop().
"""

import argparse
import base64
import binascii
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
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

# ---------------------------------------------------------------------------
# Catalog
# ---------------------------------------------------------------------------

LOCATIONS = ("westeurope", "northeurope", "eastus", "eastus2", "westus2", "westus3", "uksouth", "centralus")

# name -> (vCPUs, memory GiB)
VM_SIZES = {
    "Standard_D2s_v5": (2, 8), "Standard_D4s_v5": (4, 16), "Standard_D8s_v5": (8, 32),
    "Standard_D16s_v5": (16, 64), "Standard_D2ds_v5": (2, 8), "Standard_D4ds_v5": (4, 16),
    "Standard_D2as_v5": (2, 8), "Standard_D4as_v5": (4, 16),
    "Standard_E2s_v5": (2, 16), "Standard_E4s_v5": (4, 32), "Standard_E8s_v5": (8, 64),
    "Standard_F2s_v2": (2, 4), "Standard_F4s_v2": (4, 8), "Standard_F8s_v2": (8, 16),
    "Standard_F16s_v2": (16, 32), "Standard_B2s": (2, 4), "Standard_B1s": (1, 1),
}
SIZES_BY_LOWER = {s.lower(): s for s in VM_SIZES}

API_VERSIONS = {
    "resources": ("2021-04-01", "2022-09-01", "2023-07-01", "2024-03-01"),
    "compute": ("2024-03-01", "2024-07-01"),
    "network": ("2023-09-01", "2024-05-01"),
    "templatespecs": ("2022-02-01",),
}

# Compute's documented osProfile.adminUsername "Disallowed values".
DISALLOWED_ADMIN_USERNAMES = {
    "administrator", "admin", "user", "user1", "test", "user2", "test1", "user3", "admin1", "1", "123", "a",
    "actuser", "adm", "admin2", "aspnet", "backup", "console", "david", "guest", "john", "owner", "root",
    "server", "sql", "support", "support_388945a0", "sys", "test2", "test3", "user4", "user5",
}
STORAGE_ACCOUNT_TYPES = ("Standard_LRS", "Premium_LRS", "StandardSSD_LRS", "UltraSSD_LRS", "Premium_ZRS",
                         "StandardSSD_ZRS", "PremiumV2_LRS")
NETWORK_API_VERSIONS = ("2020-11-01", "2022-11-01")
IMAGE_SIZE_GB = 30  # every platform image is taken to be 30 GB (Ubuntu's size)
MAX_CUSTOM_DATA = 87380  # base64 characters: 65535 bytes encoded
MAX_TAGS, MAX_TAG_NAME, MAX_TAG_VALUE = 50, 512, 256
FAULT_KINDS = ("429", "503", "lost")
FAULT_METHODS = ("GET", "PUT", "PATCH", "POST", "DELETE", "HEAD")
DEFAULT_CORE_QUOTA = 1000
ARM_HOST = "https://management.azure.com"

GUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
RG_NAME_RE = re.compile(r"[-\w._()]{1,90}")
NRP_NAME_RE = re.compile(r"\w(?:[\w.-]{0,78}\w)?")
TS_NAME_RE = re.compile(r"[-\w._()]{1,90}")
VM_NAME_BAD = set('\\/"[]:|<>+=;,?*@&')
COMPUTER_NAME_BAD = set("`~!@#$%^&*()=+_[]{}\\|;:'\",<>/?")
LINUX_USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
SSH_KEY_TYPES = ("ssh-rsa", "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521")
_SEG = r"[^/]+"
SUBNET_ID_RE = re.compile(r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Network/"
                          r"virtualNetworks/(?P<vnet>[^/]+)/subnets/(?P<subnet>[^/]+)", re.I)
NIC_ID_RE = re.compile(r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Network/"
                       r"networkInterfaces/(?P<name>[^/]+)", re.I)
PIP_ID_RE = re.compile(r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Network/"
                       r"publicIPAddresses/[^/]+", re.I)
RESOURCE_ID_RE = re.compile(r"/subscriptions/[^/]+/resourceGroups/[^/]+/providers/[^/]+/[^/]+/[^/]+(/[^/]+/[^/]+)*",
                            re.I)


def iso7(t):
    """Compute's timestamps: 7 fractional digits and +00:00 ("2022-11-16T03:57:53.0532762+00:00")."""
    dt = datetime.fromtimestamp(t, timezone.utc)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond:06d}0+00:00"


def iso7z(t):
    """systemData timestamps ("2020-02-01T01:01:01.1075056Z")."""
    dt = datetime.fromtimestamp(t, timezone.utc)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond:06d}0Z"


def norm_location(value):
    """ARM accepts "West Europe", "westeurope" and "WestEurope" alike."""
    return value.replace(" ", "").lower() if isinstance(value, str) else value


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class ApiError(Exception):
    """An ARM error answer: {"error": {"code", "message", "target"?, "details"?}}."""

    def __init__(self, status, code, message, target=None, details=None, headers=None, extra=None):
        super().__init__(f"{status} {code}: {message}")
        err = {"code": code, "message": message}
        if target is not None:
            err["target"] = target
        if details is not None:
            err["details"] = details
        if extra:
            err.update(extra)
        self.status, self.body, self.headers = status, {"error": err}, dict(headers or {})


class Reply:
    def __init__(self, status, body=None, headers=None):
        self.status, self.body, self.headers = status, body, dict(headers or {})


def invalid_parameter(message, target=None):
    return ApiError(400, "InvalidParameter", message, target=target)


def required(param):
    return ApiError(400, "InvalidParameter", f"Required parameter '{param}' is missing (null).", target=param)


def not_modelled(what, target=None):
    return ApiError(400, "InvalidParameter", f"{what} (not modelled by fake_arm)", target=target)


def bad_content(path):
    return ApiError(400, "InvalidRequestContent", "The request content was invalid and could not be deserialized: "
                    f"'Could not convert the value at path '{path}' to the expected type.'")


def location_required():
    return ApiError(400, "LocationRequired", "The location property is required for this definition.")


def linked_invalid_id(value, path):
    return ApiError(400, "LinkedInvalidPropertyId", f"Property id '{value}' at path '{path}' is invalid. Expect fully "
                    "qualified resource Id that start with '/subscriptions/{subscriptionId}' or "
                    "'/providers/{resourceProviderNamespace}/'.")


def resource_not_found(rtype, name, rg):
    return ApiError(404, "ResourceNotFound", f"The Resource '{rtype}/{name}' under resource group '{rg}' was not "
                    "found. For more details please go to https://aka.ms/ARMResourceNotFoundFix")


def rg_not_found(rg):
    return ApiError(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")


def property_change(prop):
    return ApiError(409, "PropertyChangeNotAllowed", f"Changing property '{prop}' is not allowed.", target=prop)


def vm_marked_for_deletion(op, name):
    return ApiError(409, "OperationNotAllowed", f"Operation '{op}' is not allowed on VM '{name}' since the VM is "
                    "marked for deletion. You can only retry the Delete operation (or wait for an ongoing one to "
                    "complete).")


def vm_requires_running():
    return ApiError(409, "OperationNotAllowed", "The operation requires the VM to be running (or set to run).")


def nic_in_use(nic_id, vm_id, deleting):
    tail = (" In order to delete the network interface, it must be dissociated from the resource. To learn more, "
            "see aka.ms/deletenic.") if deleting else ""
    return ApiError(400, "NicInUse", f"Network Interface {nic_id} is used by existing resource {vm_id}.{tail}",
                    details=[])


def nic_reserved(vm_id):
    return ApiError(400, "NicReservedForAnotherVm", "Nic(s) in request is reserved for another Virtual Machine for "
                    "180 seconds. Please provide another nic(s) or retry after 180 seconds. Reserved VM: " + vm_id,
                    details=[])


ALLOCATION_FAILED = {
    "code": "AllocationFailed",
    "message": "Allocation failed. We do not have sufficient capacity for the requested VM size in this region. "
               "Read more about improving likelihood of allocation success at http://aka.ms/allocation-guidance",
}
PREEMPTED = {"code": "OperationPreempted",
             "message": "Operation execution has been preempted by a more recent operation."}


# ---------------------------------------------------------------------------
# Validation shared by every resource type
# ---------------------------------------------------------------------------

def validate_tags(tags):
    """ARM's tag rules (checked before the resource provider sees the request)."""
    if tags is None:
        return {}
    if not isinstance(tags, dict):
        raise bad_content("tags")
    if len(tags) > MAX_TAGS:
        raise ApiError(400, "InvalidTags", f"Too many tags specified. Requested tag count - '{len(tags)}'. "
                       f"Maximum number of tags allowed - '{MAX_TAGS}'.")
    bad_chars, long_names, long_values = [], [], []
    for name, value in tags.items():
        if not isinstance(value, str):
            raise bad_content(f"tags.{name}")
        if not name.strip():
            raise ApiError(400, "InvalidTagName", "The tag name must be non-null, non-empty and non-whitespace only. "
                           "Please provide an actual value.")
        exempt = name.lower().startswith(("hidden", "link"))
        if not exempt and any(c in '<>%&\\?/' or ord(c) < 32 or ord(c) == 127 for c in name):
            bad_chars.append(name)
        if len(name) > MAX_TAG_NAME:
            long_names.append(name)
        if len(value) > MAX_TAG_VALUE:
            long_values.append(value)
    if bad_chars:
        raise ApiError(400, "InvalidTagNameCharacters", f"The tag names '{', '.join(bad_chars)}' have reserved "
                       "characters '<,>,%,&,\\,?,/' or control characters.")
    if long_names:
        raise ApiError(400, "InvalidTagName", f"Tag key too large. Following tag name '{', '.join(long_names)}' "
                       f"exceeded the maximum length. Maximum allowed length for tag name - '{MAX_TAG_NAME}' characters.")
    if long_values:
        raise ApiError(400, "InvalidTagValueLength", f"Tag value too large. Following tag value "
                       f"'{', '.join(long_values)}' exceeded the maximum length. Maximum allowed length for tag value - "
                       f"'{MAX_TAG_VALUE}' characters.")
    return dict(tags)


def obj(parent, key, path):
    """parent[key] as a dict ({} when absent); any other JSON type is a deserialisation error."""
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_content(path)
    return value


def typed(parent, key, kind, path, default=None):
    value = parent.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise bad_content(path)
    return value


def enum(value, allowed, target):
    """Case-insensitive match against an enum; the canonical spelling is returned."""
    for a in allowed:
        if isinstance(value, str) and value.lower() == a.lower():
            return a
    raise invalid_parameter(f"The value '{value}' of parameter '{target}' is not allowed. Allowed values are "
                            f"'{', '.join(allowed)}'.", target)


def is_base64(text):
    try:
        base64.b64decode(text, validate=True)
        return True
    except (binascii.Error, ValueError):
        return False


def decode_text(b64):
    if b64 is None:
        return None
    return base64.b64decode(b64).decode("utf-8", errors="replace")


def validate_location(raw, rtype, location_list=LOCATIONS):
    if raw is None or raw == "":
        raise location_required()
    if not isinstance(raw, str):
        raise bad_content("location")
    loc = norm_location(raw)
    if loc not in location_list:
        if rtype is None:
            raise ApiError(400, "LocationNotAvailableForResourceGroup", f"The provided location '{raw}' is not "
                           f"available for resource group. List of available regions is '{','.join(location_list)}'.")
        raise ApiError(400, "LocationNotAvailableForResourceType", f"The provided location '{raw}' is not available "
                       f"for resource type '{rtype}'. List of available regions for the resource type is "
                       f"'{','.join(location_list)}'.")
    return loc


def check_subnet_id(value, path):
    if not isinstance(value, str) or not value:
        raise ApiError(400, "InvalidRequestFormat", "Cannot parse the request.", details=[
            {"code": "MissingJsonReferenceId", "message": f"Value for reference id is missing. Path {path}."}])
    if not RESOURCE_ID_RE.fullmatch(value):
        raise linked_invalid_id(value, path + ".id")
    m = SUBNET_ID_RE.fullmatch(value)
    if not m:
        return None
    return m


# ---------------------------------------------------------------------------
# VM request bodies
# ---------------------------------------------------------------------------

class VmSpec:
    """A validated VirtualMachine PUT body (only what the fake models)."""

    def __init__(self, name, body):
        props = obj(body, "properties", "properties")
        hw = obj(props, "hardwareProfile", "properties.hardwareProfile")
        size = hw.get("vmSize")
        if size is None:
            raise required("hardwareProfile")
        if not isinstance(size, str) or size.lower() not in SIZES_BY_LOWER:
            raise invalid_parameter(f"The value {size} provided for the VM size is not valid. The valid sizes in the "
                                    f"current region are: {','.join(VM_SIZES)}.", "vmSize")
        self.size = SIZES_BY_LOWER[size.lower()]
        self.vcpus = VM_SIZES[self.size][0]
        if obj(hw, "vmSizeProperties", "properties.hardwareProfile.vmSizeProperties"):
            raise not_modelled("vmSizeProperties", "vmSizeProperties")

        storage = obj(props, "storageProfile", "properties.storageProfile")
        if storage.get("dataDisks"):
            raise not_modelled("Data disks", "dataDisks")
        image = obj(storage, "imageReference", "properties.storageProfile.imageReference")
        os_disk = obj(storage, "osDisk", "properties.storageProfile.osDisk")
        create_option = os_disk.get("createOption", "FromImage")
        create_option = enum(create_option, ("FromImage", "Attach", "Empty"), "createOption")
        if create_option != "FromImage":
            raise not_modelled(f"osDisk createOption {create_option}", "createOption")
        if not image:
            raise required("imageReference")
        self.image = self._image(image)
        managed = obj(os_disk, "managedDisk", "properties.storageProfile.osDisk.managedDisk")
        if managed.get("id"):
            raise not_modelled("Attaching an existing managed disk", "managedDisk.id")
        sku = managed.get("storageAccountType", "Standard_LRS")
        size_gb = typed(os_disk, "diskSizeGB", int, "properties.storageProfile.osDisk.diskSizeGB", IMAGE_SIZE_GB)
        if size_gb < IMAGE_SIZE_GB:
            raise invalid_parameter(f"The specified disk size {size_gb} GB is smaller than the size of the "
                                    f"corresponding disk in the VM image: {IMAGE_SIZE_GB} GB. This is not allowed. "
                                    "Please choose equal or greater size or do not specify an explicit size.",
                                    "osDisk.diskSizeGB")
        if size_gb > 4095:
            raise invalid_parameter(f"The value {size_gb} of parameter 'osDisk.diskSizeGB' is out of range. The value "
                                    "must be between 1 and 4095, inclusive.", "osDisk.diskSizeGB")
        disk_name = typed(os_disk, "name", str, "properties.storageProfile.osDisk.name")
        self.os_disk = {
            "name": disk_name,
            "caching": enum(os_disk.get("caching", "ReadWrite"), ("None", "ReadOnly", "ReadWrite"), "caching"),
            "storageAccountType": enum(sku, STORAGE_ACCOUNT_TYPES, "storageAccountType"),
            "deleteOption": enum(os_disk.get("deleteOption", "Detach"), ("Delete", "Detach"), "deleteOption"),
            "diskSizeGB": size_gb,
        }

        os_profile = props.get("osProfile")
        if os_profile is None:
            raise required("osProfile")
        if not isinstance(os_profile, dict):
            raise bad_content("properties.osProfile")
        self._os_profile(name, os_profile)

        net = props.get("networkProfile")
        if net is None:
            raise required("networkProfile")
        if not isinstance(net, dict):
            raise bad_content("properties.networkProfile")
        self._network(name, net)

        self.priority = enum(props.get("priority", "Regular"), ("Regular", "Low", "Spot"), "priority")
        spot = self.priority in ("Low", "Spot")
        eviction = props.get("evictionPolicy")
        if eviction is not None and not spot:
            raise invalid_parameter("Eviction policy can be set only on Azure Spot Virtual Machines.",
                                    "evictionPolicy")
        self.eviction = enum(eviction, ("Deallocate", "Delete"), "evictionPolicy") if eviction else (
            "Deallocate" if spot else None)
        billing = obj(props, "billingProfile", "properties.billingProfile")
        self.max_price = None
        if billing:
            if not spot:
                raise invalid_parameter("Max price can be set only on Azure Spot Virtual Machines.",
                                        "billingProfile.maxPrice")
            price = billing.get("maxPrice", -1)
            if isinstance(price, bool) or not isinstance(price, (int, float)) or not (price == -1 or price > 0):
                raise invalid_parameter(f"The value {price} of parameter 'billingProfile.maxPrice' is invalid. It "
                                        "must be -1 or greater than 0.", "billingProfile.maxPrice")
            self.max_price = price
        elif spot:
            self.max_price = -1
        user_data = props.get("userData")
        if user_data is not None and (not isinstance(user_data, str) or not is_base64(user_data)
                                      or len(user_data) > MAX_CUSTOM_DATA):
            raise invalid_parameter("User data must be in Base64 encoding and with a maximum length of "
                                    f"{MAX_CUSTOM_DATA} characters.", "userData")
        self.user_data = user_data

    @staticmethod
    def _image(image):
        for alt in ("id", "sharedGalleryImageId", "communityGalleryImageId"):
            if image.get(alt):
                return {alt: image[alt]}
        out = {}
        for key in ("publisher", "offer", "sku", "version"):
            value = image.get(key)
            if not value:
                raise required(f"imageReference.{key}")
            if not isinstance(value, str):
                raise bad_content(f"properties.storageProfile.imageReference.{key}")
            out[key] = value
        if out["version"].lower() != "latest" and not re.fullmatch(r"\d+\.\d+\.\d+", out["version"]):
            raise invalid_parameter(f"The value of parameter imageReference.version is invalid: '{out['version']}'.",
                                    "imageReference.version")
        return out

    def _os_profile(self, vm_name, profile):
        if profile.get("windowsConfiguration") is not None:
            raise not_modelled("Windows VMs", "windowsConfiguration")
        computer = typed(profile, "computerName", str, "properties.osProfile.computerName", vm_name)
        if not computer or len(computer) > 64 or any(c in COMPUTER_NAME_BAD or c.isspace() for c in computer):
            raise invalid_parameter("Linux host name cannot exceed 64 characters in length or contain the following "
                                    "characters: ` ~ ! @ # $ % ^ & * ( ) = + _ [ ] { } \\ | ; : ' \" , < > / ?.",
                                    "computerName")
        self.computer_name = computer
        user = profile.get("adminUsername")
        if user is None:
            raise required("adminUsername")
        if not isinstance(user, str):
            raise bad_content("properties.osProfile.adminUsername")
        if user.lower() in DISALLOWED_ADMIN_USERNAMES or not LINUX_USER_RE.fullmatch(user):
            raise invalid_parameter("The Admin Username specified is not allowed.", "adminUsername")
        self.admin_username = user
        password = typed(profile, "adminPassword", str, "properties.osProfile.adminPassword")
        linux = obj(profile, "linuxConfiguration", "properties.osProfile.linuxConfiguration")
        disable_pw = typed(linux, "disablePasswordAuthentication", bool,
                           "properties.osProfile.linuxConfiguration.disablePasswordAuthentication", False)
        ssh = obj(linux, "ssh", "properties.osProfile.linuxConfiguration.ssh")
        keys = typed(ssh, "publicKeys", list, "properties.osProfile.linuxConfiguration.ssh.publicKeys", [])
        out_keys = []
        for i, key in enumerate(keys):
            if not isinstance(key, dict):
                raise bad_content(f"properties.osProfile.linuxConfiguration.ssh.publicKeys[{i}]")
            path, data = key.get("path"), key.get("keyData")
            if path != f"/home/{user}/.ssh/authorized_keys":
                raise invalid_parameter("The value of parameter linuxConfiguration.ssh.publicKeys.path is invalid.",
                                        "linuxConfiguration.ssh.publicKeys.path")
            parts = data.split() if isinstance(data, str) else []
            if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES or not is_base64(parts[1]):
                raise invalid_parameter("The value of parameter linuxConfiguration.ssh.publicKeys.keyData is invalid.",
                                        "linuxConfiguration.ssh.publicKeys.keyData")
            out_keys.append({"path": path, "keyData": data})
        if (disable_pw and not out_keys) or (not disable_pw and not password and not out_keys):
            raise invalid_parameter("Authentication using either SSH or by user name and password must be enabled in "
                                    "Linux profile.", "linuxConfiguration")
        if password is not None and not disable_pw:
            classes = sum([any(c.isupper() for c in password), any(c.islower() for c in password),
                           any(c.isdigit() for c in password), any(not c.isalnum() for c in password)])
            if not 6 <= len(password) <= 72 or classes < 3 or any(ord(c) < 32 for c in password):
                raise invalid_parameter(
                    "The supplied password must be between 6-72 characters long and must satisfy at least 3 of "
                    "password complexity requirements from the following:\r\n1) Contains an uppercase character\r\n"
                    "2) Contains a lowercase character\r\n3) Contains a numeric digit\r\n4) Contains a special "
                    "character\r\n5) Control characters are not allowed", "adminPassword")
        self.disable_password = disable_pw
        self.ssh_keys = out_keys
        self.provision_agent = typed(linux, "provisionVMAgent", bool,
                                     "properties.osProfile.linuxConfiguration.provisionVMAgent", True)
        custom = profile.get("customData")
        if custom is not None and (not isinstance(custom, str) or not is_base64(custom)
                                   or len(custom) > MAX_CUSTOM_DATA):
            raise invalid_parameter("Custom data in OSProfile must be in Base64 encoding and with a maximum length of "
                                    f"{MAX_CUSTOM_DATA} characters.", "customData")
        self.custom_data = custom

    def _network(self, vm_name, net):
        nics = net.get("networkInterfaces")
        configs = net.get("networkInterfaceConfigurations")
        self.nic_refs, self.nic_configs, self.network_api_version = [], [], None
        if nics and configs:
            raise invalid_parameter("Only one of networkProfile.networkInterfaces and "
                                    "networkProfile.networkInterfaceConfigurations may be specified.",
                                    "networkProfile")
        if configs:
            self._nic_configs(vm_name, net, configs)
            return
        if not nics:
            raise required("networkProfile.networkInterfaces")
        if not isinstance(nics, list):
            raise bad_content("properties.networkProfile.networkInterfaces")
        primaries = 0
        for i, ref in enumerate(nics):
            path = f"properties.networkProfile.networkInterfaces[{i}]"
            if not isinstance(ref, dict):
                raise bad_content(path)
            nic_id = ref.get("id")
            if not isinstance(nic_id, str) or not nic_id:
                raise invalid_parameter(f"Value for reference id is missing. Path {path}.", "networkInterfaces")
            if not RESOURCE_ID_RE.fullmatch(nic_id):
                raise linked_invalid_id(nic_id, path + ".id")
            m = NIC_ID_RE.fullmatch(nic_id)
            if not m:
                raise invalid_parameter(f"Resource '{nic_id}' is not a network interface.", "networkInterfaces")
            p = obj(ref, "properties", path + ".properties")
            primary = typed(p, "primary", bool, path + ".properties.primary", len(nics) == 1)
            primaries += bool(primary)
            delete_option = enum(p.get("deleteOption", "Detach"), ("Delete", "Detach"), "deleteOption")
            self.nic_refs.append({"id": nic_id, "sub": unquote(m["sub"]), "rg": unquote(m["rg"]),
                                  "name": unquote(m["name"]), "primary": bool(primary),
                                  "deleteOption": delete_option})
        if primaries != 1:
            raise invalid_parameter(f"Virtual machine {vm_name} must have one network interface set as the primary.",
                                    "networkProfile.networkInterfaces")

    def _nic_configs(self, vm_name, net, configs):
        version = net.get("networkApiVersion")
        if version is None:
            raise required("networkProfile.networkApiVersion")
        self.network_api_version = enum(version, NETWORK_API_VERSIONS, "networkApiVersion")
        if not isinstance(configs, list):
            raise bad_content("properties.networkProfile.networkInterfaceConfigurations")
        primaries = 0
        for i, cfg in enumerate(configs):
            path = f"properties.networkProfile.networkInterfaceConfigurations[{i}]"
            if not isinstance(cfg, dict):
                raise bad_content(path)
            name = cfg.get("name")
            if not isinstance(name, str) or not NRP_NAME_RE.fullmatch(name):
                raise required(f"networkInterfaceConfigurations[{i}].name")
            p = obj(cfg, "properties", path + ".properties")
            primary = typed(p, "primary", bool, path + ".properties.primary", len(configs) == 1)
            primaries += bool(primary)
            delete_option = enum(p.get("deleteOption", "Detach"), ("Delete", "Detach"), "deleteOption")
            ipcs = p.get("ipConfigurations")
            if not ipcs or not isinstance(ipcs, list):
                raise required(f"networkInterfaceConfigurations[{i}].ipConfigurations")
            ip_out = []
            for j, ipc in enumerate(ipcs):
                ipath = f"{path}.properties.ipConfigurations[{j}]"
                if not isinstance(ipc, dict) or not isinstance(ipc.get("name"), str):
                    raise required(f"ipConfigurations[{j}].name")
                ip = obj(ipc, "properties", ipath + ".properties")
                if ip.get("publicIPAddressConfiguration") is not None:
                    raise not_modelled("publicIPAddressConfiguration", "publicIPAddressConfiguration")
                subnet = obj(ip, "subnet", ipath + ".properties.subnet")
                if check_subnet_id(subnet.get("id"), ipath + ".properties.subnet") is None:
                    raise invalid_parameter(f"Resource '{subnet.get('id')}' is not a subnet.", "subnet")
                ip_out.append({"name": ipc["name"], "subnet": subnet["id"],
                               "primary": typed(ip, "primary", bool, ipath + ".properties.primary", j == 0)})
            self.nic_configs.append({"name": name, "primary": bool(primary), "deleteOption": delete_option,
                                     "ipConfigurations": ip_out, "raw": copy.deepcopy(cfg)})
        if primaries != 1:
            raise invalid_parameter(f"Virtual machine {vm_name} must have one network interface set as the primary.",
                                    "networkProfile.networkInterfaceConfigurations")


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------

class Operation:
    """A long-running operation: InProgress until done_at, then Succeeded or Failed."""

    def __init__(self, seq, op_id, provider, sub, location, api, start, stages, stage_s, kind):
        self.seq, self.id, self.provider, self.sub, self.location, self.api = seq, op_id, provider, sub, location, api
        self.start, self.done_at, self.kind = start, start + stages * stage_s, kind
        self.status, self.error, self.end = "InProgress", None, None
        self.on_done = None  # returns None or an error {"code", "message"}
        self.p = None  # Compute's opaque "p" query parameter


class ResourceGroup:
    def __init__(self, sub, name, location, tags, created):
        self.sub, self.name, self.location, self.tags, self.created = sub, name, location, tags, created
        self.deleting = None  # the delete Operation


class Vm:
    def __init__(self, sub, rg, name, location, spec, vm_id, created):
        self.sub, self.rg, self.name, self.location = sub, rg, name, location
        self.spec, self.vm_id, self.created = spec, vm_id, created
        self.tags, self.user_data = {}, spec.user_data
        self.nics = []  # [{"key", "id", "primary", "deleteOption"}]
        self.disk_key, self.disk_name = None, None
        self.power = "starting"  # starting|running|stopping|stopped|deallocating|deallocated|None
        self.failed = None  # error of the last failed allocation
        self.ops = []  # running Operations on this VM
        self.deleting = False
        self.etag = 1
        self.exact_version = None

    @property
    def key(self):
        return (self.sub.lower(), self.rg.lower(), self.name.lower())

    @property
    def id(self):
        return (f"/subscriptions/{self.sub}/resourceGroups/{self.rg}/providers/Microsoft.Compute/virtualMachines/"
                f"{self.name}")

    @property
    def provisioning_state(self):
        if self.deleting:
            return "Deleting"
        kinds = {op.kind for op in self.ops}
        if "create" in kinds:
            return "Creating"
        if kinds:
            return "Updating"
        return "Failed" if self.failed else "Succeeded"

    def holds_cores(self):
        return self.power in ("starting", "running", "stopping", "stopped", "deallocating")


class Nic:
    def __init__(self, sub, rg, name, location, tags, ipconfigs, resource_guid, etag, extra):
        self.sub, self.rg, self.name, self.location, self.tags = sub, rg, name, location, tags
        self.ipconfigs, self.resource_guid, self.etag, self.extra = ipconfigs, resource_guid, etag, extra
        self.vm_id = None  # attached VM's id
        self.vm_key = None
        self.primary = None
        self.mac = None
        self.reserved_for, self.reserved_until = None, 0.0
        self.deleting = None

    @property
    def key(self):
        return (self.sub.lower(), self.rg.lower(), self.name.lower())

    @property
    def id(self):
        return f"/subscriptions/{self.sub}/resourceGroups/{self.rg}/providers/Microsoft.Network/networkInterfaces/{self.name}"


class Disk:
    def __init__(self, sub, rg, name, vm_key, size_gb, sku, delete_option):
        self.sub, self.rg, self.name, self.vm_key = sub, rg, name, vm_key
        self.size_gb, self.sku, self.delete_option = size_gb, sku, delete_option

    @property
    def id(self):
        return f"/subscriptions/{self.sub}/resourceGroups/{self.rg}/providers/Microsoft.Compute/disks/{self.name}"


class TemplateSpec:
    def __init__(self, sub, rg, name, location):
        self.sub, self.rg, self.name, self.location = sub, rg, name, location
        self.tags, self.props, self.versions = {}, {}, {}
        self.system = None

    @property
    def id(self):
        return f"/subscriptions/{self.sub}/resourceGroups/{self.rg}/providers/Microsoft.Resources/templateSpecs/{self.name}"


class Ctx:
    """One API request, as the handlers see it."""

    def __init__(self, method, match, query, raw, base, api, headers):
        self.method, self.m, self.query, self.raw, self.base, self.api = method, match, query, raw, base, api
        self.headers = headers
        self._body = None

    def json(self, required_body=True):
        if self._body is not None:
            return self._body
        if not self.raw.strip():
            if not required_body:
                return {}
            raise ApiError(400, "InvalidRequestContent", "The request content was invalid and could not be "
                           "deserialized: 'Root element is missing.'.")
        try:
            body = json.loads(self.raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, "InvalidRequestContent", "The request content was invalid and could not be "
                           f"deserialized: '{e}'.") from None
        if not isinstance(body, dict):
            raise ApiError(400, "InvalidRequestContent", "The request content was invalid and could not be "
                           "deserialized: 'Error converting value to type 'ResourceDefinition'.'.")
        self._body = body
        return body

    @property
    def sub(self):
        return self.m["sub"]


# ---------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------

S = r"/subscriptions/(?P<sub>[^/]+)"
RGP = S + r"/resourcegroups/(?P<rg>[^/]+)"
VMS = RGP + r"/providers/microsoft\.compute/virtualmachines"
NICS = RGP + r"/providers/microsoft\.network/networkinterfaces"
TSP = RGP + r"/providers/microsoft\.resources/templatespecs/(?P<ts>[^/]+)"

# (regex, template, api family, {method: (handler, action)}); action is the RBAC action
# ("{read}" style placeholders are filled per method) and None means read of the scope.
ROUTES = [
    (RGP, "resourcegroups/{name}", "resources", {
        "PUT": ("rg_put", "Microsoft.Resources/subscriptions/resourcegroups/write"),
        "GET": ("rg_get", "Microsoft.Resources/subscriptions/resourcegroups/read"),
        "HEAD": ("rg_head", "Microsoft.Resources/subscriptions/resourcegroups/read"),
        "DELETE": ("rg_delete", "Microsoft.Resources/subscriptions/resourcegroups/delete")}),
    (S + r"/operationresults/(?P<op>[^/]+)", "operationresults/{id}", "resources", {
        "GET": ("rg_operation_result", "Microsoft.Resources/subscriptions/operationresults/read")}),
    (VMS, "virtualMachines", "compute", {
        "GET": ("vm_list", "Microsoft.Compute/virtualMachines/read")}),
    (VMS + r"/(?P<name>[^/]+)", "virtualMachines/{name}", "compute", {
        "PUT": ("vm_put", "Microsoft.Compute/virtualMachines/write"),
        "GET": ("vm_get", "Microsoft.Compute/virtualMachines/read"),
        "PATCH": ("vm_patch", "Microsoft.Compute/virtualMachines/write"),
        "DELETE": ("vm_delete", "Microsoft.Compute/virtualMachines/delete")}),
    (VMS + r"/(?P<name>[^/]+)/instanceview", "virtualMachines/{name}/instanceView", "compute", {
        "GET": ("vm_instance_view", "Microsoft.Compute/virtualMachines/instanceView/read")}),
] + [
    (VMS + r"/(?P<name>[^/]+)/" + action.lower(), "virtualMachines/{name}/" + action, "compute", {
        "POST": ("vm_" + action, f"Microsoft.Compute/virtualMachines/{action}/action")})
    for action in ("deallocate", "start", "powerOff", "restart")
] + [
    (S + r"/providers/microsoft\.compute/locations/(?P<loc>[^/]+)/operations/(?P<op>[^/]+)", "operations/{id}",
     "compute", {"GET": ("compute_operation", "Microsoft.Compute/locations/operations/read")}),
    (NICS, "networkInterfaces", "network", {
        "GET": ("nic_list", "Microsoft.Network/networkInterfaces/read")}),
    (NICS + r"/(?P<name>[^/]+)", "networkInterfaces/{name}", "network", {
        "PUT": ("nic_put", "Microsoft.Network/networkInterfaces/write"),
        "GET": ("nic_get", "Microsoft.Network/networkInterfaces/read"),
        "DELETE": ("nic_delete", "Microsoft.Network/networkInterfaces/delete")}),
    (S + r"/providers/microsoft\.network/locations/(?P<loc>[^/]+)/operations/(?P<op>[^/]+)", "networkOperations/{id}",
     "network", {"GET": ("network_operation", "Microsoft.Network/locations/operations/read")}),
    (S + r"/providers/microsoft\.network/locations/(?P<loc>[^/]+)/operationresults/(?P<op>[^/]+)",
     "networkOperationResults/{id}", "network", {
         "GET": ("network_operation_result", "Microsoft.Network/locations/operationResults/read")}),
    (TSP, "templateSpecs/{name}", "templatespecs", {
        "PUT": ("ts_put", "Microsoft.Resources/templateSpecs/write"),
        "GET": ("ts_get", "Microsoft.Resources/templateSpecs/read"),
        "DELETE": ("ts_delete", "Microsoft.Resources/templateSpecs/delete")}),
    (TSP + r"/versions/(?P<ver>[^/]+)", "templateSpecs/{name}/versions/{version}", "templatespecs", {
        "PUT": ("tsv_put", "Microsoft.Resources/templateSpecs/versions/write"),
        "GET": ("tsv_get", "Microsoft.Resources/templateSpecs/versions/read"),
        "DELETE": ("tsv_delete", "Microsoft.Resources/templateSpecs/versions/delete")}),
]
ROUTES = [(re.compile(rx, re.I), template, family, methods) for rx, template, family, methods in ROUTES]

# What ARM calls each provider resource type in NoRegisteredProviderFound.
FAMILY_TYPES = {"compute": "virtualMachines", "network": "networkInterfaces", "templatespecs": "templateSpecs"}
# Compute's throttling operation groups, by (method, template).
COMPUTE_THROTTLE_GROUPS = {"PUT": "PutVM3Min", "PATCH": "PutVM3Min", "DELETE": "DeleteVM3Min",
                           "POST": "UpdateVM3Min"}


def match_route(path):
    """(template, family, methods, groups) of the route the path belongs to, or None."""
    for rx, template, family, methods in ROUTES:
        m = rx.fullmatch(path)
        if m:
            return template, family, methods, {k: unquote(v) for k, v in m.groupdict().items()}
    return None


# ---------------------------------------------------------------------------
# Backend
# ---------------------------------------------------------------------------

class Backend:
    """All fake state, behind one lock. Handlers return Reply or raise ApiError."""

    def __init__(self, seed=None, stage_ms=150):
        self.lock = threading.RLock()
        self.seed = seed
        self.default_stage_ms = stage_ms
        self.reset()

    # -- lifecycle and control -------------------------------------------------------

    def reset(self):
        with self.lock:
            self.rng = random.Random(self.seed)
            self.fault_rng = random.Random(self.seed)
            self.config = {
                "stage_ms": self.default_stage_ms,
                "page_size": 50,
                "default_core_quota": DEFAULT_CORE_QUOTA,
                "core_quota": {},
                "spot_core_quota": {},
                "unavailable_sizes": [],
                "allocation_failures": [],
                "nic_reservation_ms": 0,
                "deny_token": None,
                "retry_after": 1,
                "patch_async_header": False,
                "strict_template_validation": True,
                "faults": {"rate": 0.0, "kinds": list(FAULT_KINDS), "seed": self.seed,
                           "methods": list(FAULT_METHODS)},
            }
            self.rgs, self.vms, self.nics, self.disks, self.specs = {}, {}, {}, {}, {}
            self.ops = {}  # id (lower) -> Operation
            self.running = []
            self.counts = {}
            self.next_ip = {}
            self.seq = 0

    def configure(self, update):
        if not isinstance(update, dict):
            raise ValueError("config must be a JSON object")
        with self.lock:
            cfg = copy.deepcopy(self.config)
            for key, value in update.items():
                if key in ("stage_ms", "nic_reservation_ms", "retry_after", "default_core_quota"):
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                        raise ValueError(f"{key} must be a number >= 0")
                    cfg[key] = value
                elif key == "page_size":
                    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                        raise ValueError("page_size must be an integer >= 1")
                    cfg[key] = value
                elif key in ("core_quota", "spot_core_quota"):
                    if not isinstance(value, dict):
                        raise ValueError(f"{key} must map location -> vCPUs")
                    for loc, limit in value.items():
                        if loc not in LOCATIONS:
                            raise ValueError(f"unknown location {loc!r}; known: {list(LOCATIONS)}")
                        if limit is None:
                            cfg[key].pop(loc, None)
                        elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                            raise ValueError(f"{key}[{loc}] must be an integer >= 0 or null")
                        else:
                            cfg[key][loc] = limit
                elif key in ("unavailable_sizes", "allocation_failures"):
                    if not isinstance(value, list) or any(not isinstance(s, str) or s.lower() not in SIZES_BY_LOWER
                                                          for s in value):
                        raise ValueError(f"{key} must list known sizes: {list(VM_SIZES)}")
                    cfg[key] = [SIZES_BY_LOWER[s.lower()] for s in value]
                elif key == "deny_token":
                    if value is not None and (not isinstance(value, str) or not value):
                        raise ValueError("deny_token must be a non-empty string or null")
                    cfg[key] = value
                elif key in ("patch_async_header", "strict_template_validation"):
                    if not isinstance(value, bool):
                        raise ValueError(f"{key} must be true or false")
                    cfg[key] = value
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

    # -- snapshots for /_fake/ ---------------------------------------------------------

    def snapshot_vms(self):
        with self.lock:
            self._advance()
            out = []
            for vm in sorted(self.vms.values(), key=lambda v: v.key):
                primary = next((n for n in vm.nics if n["primary"]), None)
                nic = self.nics.get(primary["key"]) if primary else None
                out.append({
                    "subscription": vm.sub, "resourceGroup": vm.rg, "name": vm.name, "id": vm.id,
                    "location": vm.location, "vmSize": vm.spec.size, "priority": vm.spec.priority,
                    "provisioningState": vm.provisioning_state, "powerState": vm.power, "tags": dict(vm.tags),
                    "customData": decode_text(vm.spec.custom_data), "userData": decode_text(vm.user_data),
                    "nicIds": [n["id"] for n in vm.nics],
                    "privateIp": nic.ipconfigs[0]["privateIPAddress"] if nic else None,
                    "osDiskId": self.disks[vm.disk_key].id if vm.disk_key in self.disks else None,
                    "timeCreated": iso7(vm.created),
                })
            return {"vms": out}

    def snapshot_nics(self):
        with self.lock:
            self._advance()
            now = time.time()
            out = []
            for nic in sorted(self.nics.values(), key=lambda n: n.key):
                reserved = nic.reserved_for if nic.reserved_until > now else None
                out.append({
                    "subscription": nic.sub, "resourceGroup": nic.rg, "name": nic.name, "id": nic.id,
                    "location": nic.location, "provisioningState": "Deleting" if nic.deleting else "Succeeded",
                    "privateIp": nic.ipconfigs[0]["privateIPAddress"], "attachedVm": nic.vm_id,
                    "reservedFor": reserved, "reservedUntil": nic.reserved_until if reserved else None,
                    "tags": dict(nic.tags),
                })
            return {"nics": out}

    def snapshot_disks(self):
        with self.lock:
            self._advance()
            out = []
            for key, d in sorted(self.disks.items()):
                vm = self.vms.get(d.vm_key) if d.vm_key else None
                out.append({"subscription": d.sub, "resourceGroup": d.rg, "name": d.name, "id": d.id,
                            "vm": vm.id if vm else None, "deleteOption": d.delete_option,
                            "diskSizeGB": d.size_gb, "storageAccountType": d.sku})
            return {"disks": out}

    # -- small generators ----------------------------------------------------------------

    def _guid(self):
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _private_ip(self, subnet_id):
        key = subnet_id.lower()
        n = self.next_ip.get(key, 4)  # Azure keeps the first four addresses of a subnet
        if n % 256 == 255:
            n += 1
        self.next_ip[key] = n + 1
        return f"10.0.{n // 256}.{n % 256}"

    def _mac(self):
        return "00-0D-3A-" + "-".join(f"{self.rng.randrange(256):02X}" for _ in range(3))

    # -- operations ----------------------------------------------------------------------

    def _new_op(self, provider, sub, location, api, stages, kind):
        self.seq += 1
        op = Operation(self.seq, self._guid(), provider, sub, location, api, time.time(), stages,
                       self.config["stage_ms"] / 1000.0, kind)
        op.p = self._guid()
        self.ops[op.id.lower()] = op
        self.running.append(op)
        return op

    def _advance(self, now=None):
        """Finishes, in order, every operation whose time has come."""
        now = time.time() if now is None else now
        while True:
            due = [op for op in self.running if op.done_at <= now]
            if not due:
                return
            op = min(due, key=lambda o: (o.done_at, o.seq))
            self.running.remove(op)
            error = op.on_done() if op.on_done else None
            op.status = "Failed" if error else "Succeeded"
            op.error, op.end = error, op.done_at

    def _preempt(self, op):
        if op in self.running:
            self.running.remove(op)
        op.status, op.error, op.end = "Failed", dict(PREEMPTED), time.time()

    def _compute_op_url(self, base, op, monitor=False):
        mon = "&monitor=true" if monitor else ""
        return (f"{base}/subscriptions/{op.sub}/providers/Microsoft.Compute/locations/{op.location}/operations/"
                f"{op.id}?p={op.p}{mon}&api-version={op.api}")

    def _network_op_url(self, base, op, results=False):
        kind = "operationResults" if results else "operations"
        return (f"{base}/subscriptions/{op.sub}/providers/Microsoft.Network/locations/{op.location}/{kind}/{op.id}"
                f"?api-version={op.api}")

    def _retry_after(self):
        return {"Retry-After": str(int(self.config["retry_after"]))}

    def _op(self, ctx, provider):
        op = self.ops.get(ctx.m["op"].lower())
        if (not op or op.provider != provider or op.sub.lower() != ctx.sub.lower()
                or op.location != norm_location(ctx.m.get("loc", op.location))):
            raise ApiError(404, "NotFound", "The entity was not found in this Azure location.")
        return op

    def compute_operation(self, ctx):
        op = self._op(ctx, "Microsoft.Compute")
        if ctx.query.get("monitor", "").lower() == "true":
            # The Location URL: 202 while running, then what the action would have answered.
            if op.status == "InProgress":
                return Reply(202, None, {"Location": self._compute_op_url(ctx.base, op, monitor=True),
                                         **self._retry_after()})
            if op.status == "Failed":
                raise ApiError(409, op.error["code"], op.error["message"])
            return Reply(200, None)
        body = {"startTime": iso7(op.start)}
        if op.end is not None:
            body["endTime"] = iso7(op.end)
        body["status"] = op.status
        if op.error:
            body["error"] = dict(op.error)
        body["name"] = op.id
        return Reply(200, body)

    def network_operation(self, ctx):
        op = self._op(ctx, "Microsoft.Network")
        body = {"status": op.status}
        if op.error:
            body["error"] = dict(op.error)
        return Reply(200, body)

    def network_operation_result(self, ctx):
        op = self._op(ctx, "Microsoft.Network")
        if op.status == "InProgress":
            return Reply(202, None, {"Location": self._network_op_url(ctx.base, op, results=True),
                                     **self._retry_after()})
        if op.status == "Failed":
            raise ApiError(409, op.error["code"], op.error["message"])
        return Reply(204, None)

    # -- the request pipeline ---------------------------------------------------------------

    def handle(self, method, path, query, raw, headers, base):
        route = match_route(path)
        with self.lock:
            self._advance()
            self._authenticate(headers)
            if route is None:
                raise ApiError(404, "NotFound", f"No HTTP resource was found that matches the request URI "
                               f"'{ARM_HOST}{path}'.")
            template, family, methods, m = route
            api = query.get("api-version")
            if not api:
                raise ApiError(400, "MissingApiVersionParameter", "The api-version query parameter (?api-version=) "
                               "is required for all requests.")
            if not GUID_RE.fullmatch(m["sub"]):
                raise ApiError(400, "InvalidSubscriptionId", f"The provided subscription identifier '{m['sub']}' is "
                               "malformed or invalid.")
            ctx = Ctx(method, m, query, raw, base, api, headers)
            self._check_api_version(ctx, family)
            if method not in methods:
                raise not_modelled(f"{method} on {template}")
            handler, action = methods[method]
            self._authorize(headers, action, self._scope(path, template, m))
            return getattr(self, handler)(ctx)

    @staticmethod
    def _authenticate(headers):
        auth = headers.get("Authorization")
        if auth is None:
            raise ApiError(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing.",
                           headers={"WWW-Authenticate": 'Bearer authorization_uri="https://login.microsoftonline.com/'
                                    'common", error="invalid_token", error_description="The authentication failed '
                                    'because of missing \'Authorization\' header."'})
        parts = auth.split(None, 1)
        if len(parts) != 2 or parts[0].lower() != "bearer" or not parts[1].strip():
            raise ApiError(401, "AuthenticationFailedInvalidHeader", "Authentication failed. The 'Authorization' "
                           "header is provided in an invalid format.")

    def _authorize(self, headers, action, scope):
        token = headers.get("Authorization", "").split(None, 1)[1].strip()
        deny = self.config["deny_token"]
        if deny is not None and token == deny:
            oid = str(uuid.uuid5(uuid.NAMESPACE_URL, "fake-arm:" + token))
            raise ApiError(403, "AuthorizationFailed", f"The client '{oid}' with object id '{oid}' does not have "
                           f"authorization to perform action '{action}' over scope '{scope}' or the scope is "
                           "invalid. If access was recently granted, please refresh your credentials.")

    @staticmethod
    def _scope(path, template, m):
        if template.startswith("resourcegroups"):
            return f"/subscriptions/{m['sub']}/resourcegroups/{m['rg']}"
        return unquote(path)

    def _check_api_version(self, ctx, family):
        supported = API_VERSIONS[family]
        if ctx.api in supported:
            return
        if family == "resources":
            raise ApiError(400, "InvalidApiVersionParameter", f"The api-version '{ctx.api}' is invalid. The "
                           f"supported versions are '{','.join(sorted(supported, reverse=True))}'. Please note that "
                           "the api-version is case sensitive.")
        location = ""
        if ctx.m.get("loc"):
            location = norm_location(ctx.m["loc"])
        else:
            try:
                loc = ctx.json(required_body=False).get("location")
                location = norm_location(loc) if isinstance(loc, str) else ""
            except ApiError:
                pass
            if not location and ctx.m.get("rg"):
                rg = self.rgs.get((ctx.sub.lower(), ctx.m["rg"].lower()))
                location = rg.location if rg else ""
        raise ApiError(400, "NoRegisteredProviderFound", f"No registered resource provider found for location "
                       f"'{location}' and API version '{ctx.api}' for type '{FAMILY_TYPES[family]}'. The supported "
                       f"api-versions are '{', '.join(supported)}'. The supported locations are "
                       f"'{', '.join(LOCATIONS)}'.")

    # -- resource groups -------------------------------------------------------------------

    def _rg(self, ctx, write=False):
        rg = self.rgs.get((ctx.sub.lower(), ctx.m["rg"].lower()))
        if not rg:
            raise rg_not_found(ctx.m["rg"])
        if write and rg.deleting:
            raise ApiError(409, "ResourceGroupBeingDeleted", f"The resource group '{rg.name}' is in deprovisioning "
                           "state and cannot perform this operation.")
        return rg

    @staticmethod
    def _rg_view(rg):
        body = {"id": f"/subscriptions/{rg.sub}/resourceGroups/{rg.name}", "name": rg.name,
                "type": "Microsoft.Resources/resourceGroups", "location": rg.location}
        if rg.tags:
            body["tags"] = dict(rg.tags)
        body["properties"] = {"provisioningState": "Deleting" if rg.deleting else "Succeeded"}
        return body

    def rg_put(self, ctx):
        name = ctx.m["rg"]
        if not RG_NAME_RE.fullmatch(name) or name.endswith("."):
            bad = "".join(sorted({c for c in name if not (c.isalnum() or c in "-_.()")})) or name[-1:]
            raise ApiError(400, "InvalidResourceGroup", f"The provided resource group name '{name}' has these invalid "
                           f"characters: '{bad}'. The name can only be a letter, digit, '-', '.', '(', ')' or '_'. See "
                           "https://aka.ms/resource-group-naming-restrictions for more details.")
        body = ctx.json()
        tags = validate_tags(body.get("tags"))
        loc = validate_location(body.get("location"), None)
        key = (ctx.sub.lower(), name.lower())
        rg = self.rgs.get(key)
        if rg:
            if rg.deleting:
                raise ApiError(409, "ResourceGroupBeingDeleted", f"The resource group '{rg.name}' is in "
                               "deprovisioning state and cannot perform this operation.")
            if rg.location != loc:
                raise ApiError(409, "InvalidResourceGroupLocation", f"Invalid resource group location '{loc}'. The "
                               f"Resource group already exists in location '{rg.location}'.")
            rg.tags = tags
            return Reply(200, self._rg_view(rg))
        rg = self.rgs[key] = ResourceGroup(ctx.sub, name, loc, tags, time.time())
        return Reply(201, self._rg_view(rg))

    def rg_get(self, ctx):
        return Reply(200, self._rg_view(self._rg(ctx)))

    def rg_head(self, ctx):
        rg = self.rgs.get((ctx.sub.lower(), ctx.m["rg"].lower()))
        return Reply(204 if rg else 404, None)

    def rg_delete(self, ctx):
        rg = self._rg(ctx)
        if not rg.deleting:
            op = self._new_op("Microsoft.Resources", rg.sub, rg.location, ctx.api, 1, "delete")
            rg.deleting = op
            key = (rg.sub.lower(), rg.name.lower())

            def done():
                for store in (self.vms, self.nics, self.disks, self.specs):
                    for k in [k for k in store if k[:2] == key]:
                        del store[k]
                self.rgs.pop(key, None)
            op.on_done = done
        op = rg.deleting
        location = f"{ctx.base}/subscriptions/{rg.sub}/operationresults/{op.id}?api-version={ctx.api}"
        return Reply(202, None, {"Location": location, **self._retry_after()})

    def rg_operation_result(self, ctx):
        op = self.ops.get(ctx.m["op"].lower())
        if not op or op.provider != "Microsoft.Resources" or op.sub.lower() != ctx.sub.lower():
            raise ApiError(404, "NotFound", "The operation was not found.")
        if op.status == "InProgress":
            location = f"{ctx.base}/subscriptions/{op.sub}/operationresults/{op.id}?api-version={ctx.api}"
            return Reply(202, None, {"Location": location, **self._retry_after()})
        return Reply(200, None)

    # -- virtual machines: views ---------------------------------------------------------------

    def _vm(self, ctx, op_name=None):
        self._rg(ctx)
        vm = self.vms.get((ctx.sub.lower(), ctx.m["rg"].lower(), ctx.m["name"].lower()))
        if not vm:
            raise resource_not_found("Microsoft.Compute/virtualMachines", ctx.m["name"], ctx.m["rg"])
        if op_name and vm.deleting:
            raise vm_marked_for_deletion(op_name, vm.name)
        return vm

    def _vm_view(self, vm, expand=None):
        spec = vm.spec
        disk = self.disks.get(vm.disk_key)
        image = dict(spec.image)
        if "publisher" in image and vm.exact_version:
            image["exactVersion"] = vm.exact_version
        managed = {"storageAccountType": spec.os_disk["storageAccountType"]}
        if disk and vm.provisioning_state != "Creating":
            managed["id"] = disk.id
        linux = {"disablePasswordAuthentication": spec.disable_password}
        if spec.ssh_keys:
            linux["ssh"] = {"publicKeys": copy.deepcopy(spec.ssh_keys)}
        linux["provisionVMAgent"] = spec.provision_agent
        net = {"networkInterfaces": [{"id": n["id"], "properties": {"primary": n["primary"],
                                                                    "deleteOption": n["deleteOption"]}}
                                     for n in vm.nics]}
        if spec.nic_configs:
            net["networkApiVersion"] = spec.network_api_version
            net["networkInterfaceConfigurations"] = [copy.deepcopy(c["raw"]) for c in spec.nic_configs]
        props = {
            "vmId": vm.vm_id,
            "hardwareProfile": {"vmSize": spec.size},
            "storageProfile": {
                "imageReference": image,
                "osDisk": {"osType": "Linux", "name": vm.disk_name, "createOption": "FromImage",
                           "caching": spec.os_disk["caching"], "managedDisk": managed,
                           "deleteOption": spec.os_disk["deleteOption"], "diskSizeGB": spec.os_disk["diskSizeGB"]},
                "dataDisks": [],
            },
            "osProfile": {"computerName": spec.computer_name, "adminUsername": spec.admin_username,
                          "linuxConfiguration": linux, "secrets": [], "allowExtensionOperations": True,
                          "requireGuestProvisionSignal": True},
            "networkProfile": net,
        }
        if spec.priority != "Regular":
            props["priority"] = spec.priority
            props["evictionPolicy"] = spec.eviction
            props["billingProfile"] = {"maxPrice": spec.max_price}
        if expand == "userData" and vm.user_data is not None:
            props["userData"] = vm.user_data
        props["provisioningState"] = vm.provisioning_state
        if expand == "instanceView":
            props["instanceView"] = self._instance_view(vm)
        props["timeCreated"] = iso7(vm.created)
        body = {"name": vm.name, "id": vm.id, "type": "Microsoft.Compute/virtualMachines", "location": vm.location}
        if vm.tags:
            body["tags"] = dict(vm.tags)
        body["etag"] = f'"{vm.etag}"'
        body["properties"] = props
        return body

    def _instance_view(self, vm):
        now = time.time()
        state = vm.provisioning_state
        statuses = []
        if vm.failed and state == "Failed":
            statuses.append({"code": f"ProvisioningState/failed/{vm.failed['code']}", "level": "Error",
                             "displayStatus": "Provisioning failed", "message": vm.failed["message"],
                             "time": iso7(now)})
        else:
            display = {"Succeeded": "Provisioning succeeded"}.get(state, state)
            statuses.append({"code": f"ProvisioningState/{state.lower()}", "level": "Info", "displayStatus": display,
                             "time": iso7(now)})
        if vm.power:
            statuses.append({"code": f"PowerState/{vm.power}", "level": "Info", "displayStatus": f"VM {vm.power}"})
        view = {"computerName": vm.spec.computer_name}
        if vm.power == "running":
            view["osName"] = "ubuntu"
            view["osVersion"] = "22.04"
            view["vmAgent"] = {"vmAgentVersion": "2.11.1.4", "statuses": [{
                "code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Ready",
                "message": "Guest Agent is running", "time": iso7(now)}]}
        view["disks"] = [{"name": vm.disk_name, "statuses": [{
            "code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Provisioning succeeded",
            "time": iso7(vm.created)}]}]
        view["hyperVGeneration"] = "V2"
        view["statuses"] = statuses
        return view

    def vm_get(self, ctx):
        expand = ctx.query.get("$expand")
        if expand is not None and expand not in ("instanceView", "userData"):
            raise invalid_parameter(f"The value '{expand}' of parameter '$expand' is not allowed. Allowed values are "
                                    "'instanceView, userData'.", "$expand")
        return Reply(200, self._vm_view(self._vm(ctx), expand))

    def vm_instance_view(self, ctx):
        return Reply(200, self._instance_view(self._vm(ctx)))

    def vm_list(self, ctx):
        self._rg(ctx)
        scope = (ctx.sub.lower(), ctx.m["rg"].lower())
        vms = sorted((v for v in self.vms.values() if v.key[:2] == scope), key=lambda v: v.name.lower())
        # VirtualMachines_List (2024-07-01) takes $expand=instanceView: power states in the list.
        expand = ctx.query.get("$expand")
        if expand is not None and expand != "instanceView":
            raise invalid_parameter(f"The value '{expand}' of parameter '$expand' is not allowed. Allowed values are "
                                    "'instanceView'.", "$expand")
        page, token = self._page(ctx, vms, "virtualMachines")
        body = {"value": [self._vm_view(v, expand) for v in page]}
        if token:
            body["nextLink"] = (f"{ctx.base}/subscriptions/{ctx.sub}/resourceGroups/{ctx.m['rg']}/providers/"
                                f"Microsoft.Compute/virtualMachines?api-version={ctx.api}"
                                + ("&$expand=instanceView" if expand else "")
                                + f"&$skiptoken={quote(token)}")
        return Reply(200, body)

    def _page(self, ctx, rows, kind):
        key = f"{ctx.sub.lower()}/{ctx.m['rg'].lower()}/{kind}"
        token = ctx.query.get("$skiptoken")
        offset = 0
        if token:
            try:
                raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
                if raw["k"] != key or not isinstance(raw["o"], int) or raw["o"] < 0:
                    raise ValueError
                offset = raw["o"]
            except (ValueError, KeyError, TypeError, binascii.Error):
                raise invalid_parameter("The value of parameter $skiptoken is invalid.", "$skiptoken") from None
        size = self.config["page_size"]
        page = rows[offset:offset + size]
        next_token = None
        if offset + size < len(rows):
            raw = json.dumps({"o": offset + size, "k": key, "n": self.rng.getrandbits(32)}).encode()
            next_token = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        return page, next_token

    # -- virtual machines: capacity ------------------------------------------------------------

    def _check_capacity(self, sub, location, spec, resource_id, exclude=None):
        """SkuNotAvailable, then the regional (or Spot) vCPU quota; both answer synchronously."""
        if spec.size in self.config["unavailable_sizes"]:
            raise ApiError(409, "SkuNotAvailable", "The requested VM size for resource 'Following SKUs have failed for "
                           f"Capacity Restrictions: {spec.size}' is currently not available in location '{location}'. "
                           "Please try another size or deploy to a different location or different zone. See "
                           "https://aka.ms/azureskunotavailable for details.")
        spot = spec.priority != "Regular"
        quotas = self.config["spot_core_quota"] if spot else self.config["core_quota"]
        limit = quotas.get(location, self.config["default_core_quota"])
        usage = sum(v.spec.vcpus for v in self.vms.values()
                    if v is not exclude and v.sub.lower() == sub.lower() and v.location == location
                    and (v.spec.priority != "Regular") == spot and v.holds_cores())
        if usage + spec.vcpus > limit:
            which = "LowPriorityCores" if spot else "Total Regional Cores"
            raise ApiError(409, "OperationNotAllowed", f"Operation could not be completed as it results in exceeding "
                           f"approved {which} quota. Additional details - Deployment Model: Resource Manager, "
                           f"Location: {location}, Current Limit: {limit}, Current Usage: {usage}, Additional "
                           f"Required: {spec.vcpus}, (Minimum) New Limit Required: {usage + spec.vcpus}. Submit a "
                           "request for Quota increase at https://aka.ms/ProdportalCRP/?#create/Microsoft.Support/"
                           f"Parameters/%7B%22subId%22:%22{sub}%22,%22pesId%22:%2206bfd9d3-516b-d5c6-5802-169c800dec89"
                           "%22,%22supportTopicId%22:%22e12e3d1d-7fa0-af33-c6d0-3c50df9658a3%22%7D by specifying "
                           "parameters listed in the ‘Details’ section for deployment to succeed. Please read more "
                           "about quota limits at https://docs.microsoft.com/en-us/azure/azure-supportability/"
                           "regional-quota-requests.")

    def _allocate(self, vm, op):
        """The VM gets cores when op finishes, or fails with AllocationFailed (config allocation_failures)."""
        fails = vm.spec.size in self.config["allocation_failures"]
        vm.power = "starting"
        vm.ops.append(op)

        def done():
            vm.ops.remove(op)
            if fails:
                vm.failed, vm.power = dict(ALLOCATION_FAILED), None
                return dict(ALLOCATION_FAILED)
            vm.failed, vm.power = None, "running"
            return None
        op.on_done = done

    # -- virtual machines: create and update -----------------------------------------------------

    def _resolve_nics(self, sub, location, spec, vm_id):
        """The NICs a new VM attaches, checked as Compute checks them."""
        nics = []
        now = time.time()
        for ref in spec.nic_refs:
            nic = self.nics.get((ref["sub"].lower(), ref["rg"].lower(), ref["name"].lower()))
            if not nic or nic.deleting:
                raise ApiError(404, "NotFound", f"Resource {ref['id']} not found.")
            if nic.location != location:
                raise invalid_parameter(f"The network interface {nic.id} is in location '{nic.location}', but the "
                                        f"virtual machine is in location '{location}'. They must be in the same "
                                        "location.", "networkInterfaces")
            if nic.vm_id and nic.vm_id.lower() != vm_id.lower():
                raise nic_in_use(nic.id, nic.vm_id, deleting=False)
            if nic.reserved_until > now and nic.reserved_for.lower() != vm_id.lower():
                raise nic_reserved(nic.reserved_for)
            nics.append((nic, ref))
        return nics

    def vm_put(self, ctx):
        rg = self._rg(ctx, write=True)
        name = ctx.m["name"]
        if (not 1 <= len(name) <= 64 or any(c in VM_NAME_BAD or c.isspace() for c in name) or name.startswith("_")
                or name.endswith((".", "-"))):
            raise invalid_parameter(f"The specified virtual machine name '{name}' is not valid. It can be up to 64 "
                                    "characters long, cannot contain \\/\"[]:|<>+=;,?*@& or whitespace, cannot begin "
                                    "with '_' and cannot end with '.' or '-'.", "vmName")
        body = ctx.json()
        tags = validate_tags(body.get("tags"))
        location = validate_location(body.get("location"), "Microsoft.Compute/virtualMachines")
        key = (ctx.sub.lower(), rg.name.lower(), name.lower())
        existing = self.vms.get(key)
        self._check_conditions(ctx, existing)
        spec = VmSpec(name, body)
        if existing:
            return self._vm_update(ctx, existing, spec, tags, location)
        vm_id = f"/subscriptions/{ctx.sub}/resourceGroups/{ctx.m['rg']}/providers/Microsoft.Compute/virtualMachines/{name}"
        nics = self._resolve_nics(ctx.sub, location, spec, vm_id)
        self._check_capacity(ctx.sub, location, spec, vm_id)
        vm = Vm(ctx.sub, ctx.m["rg"], name, location, spec, self._guid(), time.time())
        vm.tags = tags
        if "publisher" in spec.image:
            vm.exact_version = "22.04.202411010" if spec.image["version"].lower() == "latest" else spec.image["version"]
        for nic, ref in nics:
            self._attach(vm, nic, ref["primary"], ref["deleteOption"], ref["id"])
        for cfg in spec.nic_configs:
            nic = self._create_nic_for_config(vm, cfg)
            self._attach(vm, nic, cfg["primary"], cfg["deleteOption"], nic.id)
        disk_name = spec.os_disk["name"] or f"{name}_OsDisk_1_{uuid.UUID(self._guid()).hex}"
        vm.disk_name = disk_name
        disk = Disk(ctx.sub, ctx.m["rg"], disk_name, vm.key, spec.os_disk["diskSizeGB"],
                    spec.os_disk["storageAccountType"], spec.os_disk["deleteOption"])
        vm.disk_key = (ctx.sub.lower(), ctx.m["rg"].lower(), disk_name.lower())
        self.disks[vm.disk_key] = disk
        self.vms[key] = vm
        op = self._new_op("Microsoft.Compute", ctx.sub, location, ctx.api, 2, "create")
        self._allocate(vm, op)
        return Reply(201, self._vm_view(vm), {"Azure-AsyncOperation": self._compute_op_url(ctx.base, op),
                                              **self._retry_after()})

    def _check_conditions(self, ctx, vm):
        if_match, if_none = ctx.headers.get("If-Match"), ctx.headers.get("If-None-Match")
        if if_none is not None:
            if if_none != "*":
                raise invalid_parameter("If-None-Match only supports '*'.", "If-None-Match")
            if vm:
                raise ApiError(412, "PreconditionFailed", "The resource already exists and If-None-Match '*' was "
                               "specified.")
        if if_match is not None and if_match != "*" and (not vm or if_match != f'"{vm.etag}"'):
            raise ApiError(412, "PreconditionFailed", f"The specified precondition 'If-Match = {if_match}' failed.")
        if if_match == "*" and not vm:
            raise ApiError(412, "PreconditionFailed", "The specified precondition 'If-Match = *' failed.")

    def _attach(self, vm, nic, primary, delete_option, ref_id):
        nic.vm_id, nic.vm_key, nic.primary = vm.id, vm.key, primary
        nic.mac = nic.mac or self._mac()
        nic.reserved_for, nic.reserved_until = None, 0.0
        vm.nics.append({"key": nic.key, "id": ref_id, "primary": primary, "deleteOption": delete_option})

    def _create_nic_for_config(self, vm, cfg):
        name = f"{vm.name}-{cfg['name']}"
        key = (vm.sub.lower(), vm.rg.lower(), name.lower())
        if key in self.nics:
            raise ApiError(409, "Conflict", f"A network interface named {name} already exists.")
        ipconfigs = []
        for ipc in cfg["ipConfigurations"]:
            ipconfigs.append({"name": ipc["name"], "privateIPAddress": self._private_ip(ipc["subnet"]),
                              "privateIPAllocationMethod": "Dynamic", "subnet": ipc["subnet"],
                              "primary": ipc["primary"], "publicIPAddress": None})
        nic = Nic(vm.sub, vm.rg, name, vm.location, {}, ipconfigs, self._guid(), self._guid(), {})
        self.nics[key] = nic
        return nic

    def _vm_update(self, ctx, vm, spec, tags, location):
        if vm.deleting:
            raise vm_marked_for_deletion("PutVM", vm.name)
        old = vm.spec
        if location != vm.location:
            raise ApiError(400, "InvalidResourceLocation", f"The resource '{vm.name}' already exists in location "
                           f"'{vm.location}' in resource group '{vm.rg}'. A resource with the same name cannot be "
                           f"created in location '{location}'. Please select a new resource name.")
        for prop, a, b in (("computerName", old.computer_name, spec.computer_name),
                           ("adminUsername", old.admin_username, spec.admin_username),
                           ("customData", old.custom_data, spec.custom_data),
                           ("imageReference", old.image, spec.image),
                           ("osDisk.deleteOption", old.os_disk["deleteOption"], spec.os_disk["deleteOption"]),
                           ("osDisk.diskSizeGB", old.os_disk["diskSizeGB"], spec.os_disk["diskSizeGB"]),
                           ("priority", old.priority, spec.priority)):
            if a != b:
                raise property_change(prop)
        if spec.os_disk["name"] and spec.os_disk["name"].lower() != vm.disk_name.lower():
            raise property_change("osDisk.name")
        if spec.size != old.size:
            raise not_modelled("Resizing a VM", "vmSize")
        if spec.nic_configs or old.nic_configs:
            same_nics = [c["name"] for c in spec.nic_configs] == [c["name"] for c in old.nic_configs]
        else:
            same_nics = ([(r["id"].lower(), r["primary"]) for r in spec.nic_refs]
                         == [(n["id"].lower(), n["primary"]) for n in vm.nics])
        if not same_nics:
            raise not_modelled("Changing a VM's network interfaces", "networkProfile")
        retry = bool(vm.failed) and not vm.ops
        if retry:
            self._check_capacity(vm.sub, vm.location, spec, vm.id, exclude=vm)
        spec.os_disk["name"] = vm.disk_name
        vm.spec, vm.tags, vm.user_data = spec, tags, spec.user_data
        for n in vm.nics:  # deleteOption of attached NICs may change
            ref = next((r for r in spec.nic_refs if r["id"].lower() == n["id"].lower()), None)
            if ref:
                n["deleteOption"] = ref["deleteOption"]
        vm.etag += 1
        op = self._new_op("Microsoft.Compute", vm.sub, vm.location, ctx.api, 1, "update")
        if retry:
            self._allocate(vm, op)
        else:
            vm.ops.append(op)
            op.on_done = lambda: vm.ops.remove(op)
        return Reply(200, self._vm_view(vm), {"Azure-AsyncOperation": self._compute_op_url(ctx.base, op)})

    def vm_patch(self, ctx):
        vm = self._vm(ctx)
        self._check_conditions(ctx, vm)
        if vm.deleting:
            raise vm_marked_for_deletion("PatchVM", vm.name)
        body = ctx.json()
        tags = validate_tags(body.get("tags")) if "tags" in body else None
        props = obj(body, "properties", "properties")
        size = obj(props, "hardwareProfile", "properties.hardwareProfile").get("vmSize")
        if size is not None and (not isinstance(size, str) or size.lower() != vm.spec.size.lower()):
            raise not_modelled("Resizing a VM", "vmSize")
        os_profile = obj(props, "osProfile", "properties.osProfile")
        for prop, current in (("customData", vm.spec.custom_data), ("adminUsername", vm.spec.admin_username),
                              ("computerName", vm.spec.computer_name)):
            if prop in os_profile and os_profile[prop] != current:
                raise property_change(prop)
        user_data = vm.user_data
        if "userData" in props:
            user_data = props["userData"]
            if user_data is not None and (not isinstance(user_data, str) or not is_base64(user_data)
                                          or len(user_data) > MAX_CUSTOM_DATA):
                raise invalid_parameter("User data must be in Base64 encoding and with a maximum length of "
                                        f"{MAX_CUSTOM_DATA} characters.", "userData")
        if tags is not None:
            vm.tags = tags
        vm.user_data = user_data
        vm.etag += 1
        op = self._new_op("Microsoft.Compute", vm.sub, vm.location, ctx.api, 1, "update")
        vm.ops.append(op)
        op.on_done = lambda: vm.ops.remove(op)
        headers = {}
        if self.config["patch_async_header"]:
            headers["Azure-AsyncOperation"] = self._compute_op_url(ctx.base, op)
        return Reply(200, self._vm_view(vm), headers)

    # -- virtual machines: power actions and delete ---------------------------------------------

    def _busy(self, vm, action):
        busy = [op for op in vm.ops if op.kind in ("create", "power")]
        if busy:
            doing = {"starting": "starting", "stopping": "stopping", "deallocating": "deallocating"}.get(
                vm.power, "being updated")
            if busy[0].kind == "create":
                doing = "being created"
            raise ApiError(409, "OperationNotAllowed", f"Operation '{action}' is not allowed on VM '{vm.name}' since "
                           f"the VM is {doing}. Retry after the ongoing operation completes.")

    def _power_op(self, ctx, vm, transitional, final, retry_after):
        op = self._new_op("Microsoft.Compute", vm.sub, vm.location, ctx.api, 1 if transitional else 0, "power")
        if transitional:
            vm.power = transitional
            vm.ops.append(op)

            def done():
                vm.ops.remove(op)
                vm.power = final
            op.on_done = done
        headers = {"Azure-AsyncOperation": self._compute_op_url(ctx.base, op),
                   "Location": self._compute_op_url(ctx.base, op, monitor=True)}
        if retry_after:
            headers.update(self._retry_after())
        return Reply(202, None, headers)

    def vm_deallocate(self, ctx):
        vm = self._vm(ctx, "deallocate")
        if ctx.query.get("hibernate", "").lower() == "true":
            raise not_modelled("Hibernation", "hibernate")
        self._busy(vm, "deallocate")
        if vm.power in ("deallocated", None):
            vm.failed = None
            vm.power = "deallocated"
            return self._power_op(ctx, vm, None, None, True)
        return self._power_op(ctx, vm, "deallocating", "deallocated", True)

    def vm_start(self, ctx):
        vm = self._vm(ctx, "start")
        self._busy(vm, "start")
        if vm.power == "running":
            return self._power_op(ctx, vm, None, None, True)
        if vm.power == "stopped":
            return self._power_op(ctx, vm, "starting", "running", True)
        self._check_capacity(vm.sub, vm.location, vm.spec, vm.id, exclude=vm)  # deallocated or failed
        op = self._new_op("Microsoft.Compute", vm.sub, vm.location, ctx.api, 1, "power")
        self._allocate(vm, op)
        return Reply(202, None, {"Azure-AsyncOperation": self._compute_op_url(ctx.base, op),
                                 "Location": self._compute_op_url(ctx.base, op, monitor=True),
                                 **self._retry_after()})

    def vm_powerOff(self, ctx):
        vm = self._vm(ctx, "powerOff")
        self._busy(vm, "powerOff")
        if vm.power == "stopped":
            return self._power_op(ctx, vm, None, None, False)
        if vm.power != "running":
            raise vm_requires_running()
        return self._power_op(ctx, vm, "stopping", "stopped", False)

    def vm_restart(self, ctx):
        vm = self._vm(ctx, "restart")
        self._busy(vm, "restart")
        if vm.power != "running":
            raise vm_requires_running()
        return self._power_op(ctx, vm, "starting", "running", False)

    def vm_delete(self, ctx):
        self._rg(ctx)
        vm = self.vms.get((ctx.sub.lower(), ctx.m["rg"].lower(), ctx.m["name"].lower()))
        if not vm:
            return Reply(204, None)
        if not vm.deleting:
            for op in list(vm.ops):
                self._preempt(op)
            vm.ops = []
            vm.deleting = self._new_op("Microsoft.Compute", vm.sub, vm.location, ctx.api, 1, "delete")
            vm.deleting.on_done = lambda: self._remove_vm(vm)
        op = vm.deleting
        return Reply(202, None, {"Azure-AsyncOperation": self._compute_op_url(ctx.base, op),
                                 "Location": self._compute_op_url(ctx.base, op, monitor=True),
                                 **self._retry_after()})

    def _remove_vm(self, vm):
        self.vms.pop(vm.key, None)
        disk = self.disks.get(vm.disk_key)
        if disk:
            if disk.delete_option == "Delete":
                del self.disks[vm.disk_key]
            else:
                disk.vm_key = None
        until = time.time() + self.config["nic_reservation_ms"] / 1000.0
        for ref in vm.nics:
            nic = self.nics.get(ref["key"])
            if not nic:
                continue
            if ref["deleteOption"] == "Delete":
                del self.nics[ref["key"]]
            else:
                nic.vm_id = nic.vm_key = nic.primary = None
                nic.reserved_for, nic.reserved_until = vm.id, until

    # -- network interfaces ---------------------------------------------------------------------

    def _nic(self, ctx):
        self._rg(ctx)
        nic = self.nics.get((ctx.sub.lower(), ctx.m["rg"].lower(), ctx.m["name"].lower()))
        if not nic:
            raise resource_not_found("Microsoft.Network/networkInterfaces", ctx.m["name"], ctx.m["rg"])
        return nic

    def _nic_view(self, nic):
        etag = f'W/"{nic.etag}"'
        configs = []
        for ipc in nic.ipconfigs:
            p = {"provisioningState": "Succeeded", "privateIPAddress": ipc["privateIPAddress"],
                 "privateIPAllocationMethod": ipc["privateIPAllocationMethod"], "subnet": {"id": ipc["subnet"]}}
            if ipc.get("publicIPAddress"):
                p["publicIPAddress"] = {"id": ipc["publicIPAddress"]}
            p["primary"] = ipc["primary"]
            p["privateIPAddressVersion"] = "IPv4"
            configs.append({"name": ipc["name"], "id": f"{nic.id}/ipConfigurations/{ipc['name']}", "etag": etag,
                            "type": "Microsoft.Network/networkInterfaces/ipConfigurations", "properties": p})
        props = {"provisioningState": "Deleting" if nic.deleting else "Succeeded", "resourceGuid": nic.resource_guid,
                 "ipConfigurations": configs,
                 "dnsSettings": {"dnsServers": [], "appliedDnsServers": [],
                                 "internalDomainNameSuffix": f"{nic.resource_guid[:26].replace('-', '')}."
                                                             f"ax.internal.cloudapp.net"}}
        if nic.vm_id:
            props["macAddress"] = nic.mac
        props.update({"enableAcceleratedNetworking": nic.extra.get("enableAcceleratedNetworking", False),
                      "vnetEncryptionSupported": False,
                      "enableIPForwarding": nic.extra.get("enableIPForwarding", False),
                      "disableTcpStateTracking": False, "hostedWorkloads": [], "tapConfigurations": [],
                      "nicType": "Standard", "allowPort25Out": True})
        if nic.vm_id:
            props["primary"] = nic.primary
            props["virtualMachine"] = {"id": nic.vm_id}
        body = {"name": nic.name, "id": nic.id, "etag": etag, "location": nic.location}
        if nic.tags:
            body["tags"] = dict(nic.tags)
        body.update({"properties": props, "type": "Microsoft.Network/networkInterfaces", "kind": "Regular"})
        return body

    def nic_put(self, ctx):
        self._rg(ctx, write=True)
        name = ctx.m["name"]
        if not NRP_NAME_RE.fullmatch(name):
            raise ApiError(400, "InvalidResourceName", f"Resource name {name} is invalid. The name can be up to 80 "
                           "characters long. It must begin with a word character, and it must end with a word "
                           "character or with '_'. The name may contain word characters or '.', '-', '_'.")
        body = ctx.json()
        tags = validate_tags(body.get("tags"))
        location = validate_location(body.get("location"), "Microsoft.Network/networkInterfaces")
        key = (ctx.sub.lower(), ctx.m["rg"].lower(), name.lower())
        existing = self.nics.get(key)
        if existing and existing.location != location:
            raise ApiError(400, "InvalidResourceLocation", f"The resource '{name}' already exists in location "
                           f"'{existing.location}' in resource group '{ctx.m['rg']}'. A resource with the same name "
                           f"cannot be created in location '{location}'. Please select a new resource name.")
        if existing and existing.deleting:
            raise ApiError(409, "AnotherOperationInProgress", f"Another operation on this or dependent resource is in "
                           f"progress. To retrieve status of the operation use uri: "
                           f"{self._network_op_url(ctx.base, existing.deleting)}.")
        props = obj(body, "properties", "properties")
        nic_id = f"/subscriptions/{ctx.sub}/resourceGroups/{ctx.m['rg']}/providers/Microsoft.Network/networkInterfaces/{name}"
        raw_configs = props.get("ipConfigurations")
        if not raw_configs or not isinstance(raw_configs, list):
            raise ApiError(400, "InvalidRequestFormat", "Cannot parse the request.", details=[
                {"code": "MissingJsonProperty", "message": "Network interface must have at least one IP "
                                                           "configuration. Path properties.ipConfigurations."}])
        ipconfigs, primaries = [], 0
        old = {c["name"].lower(): c for c in existing.ipconfigs} if existing else {}
        for i, ipc in enumerate(raw_configs):
            path = f"properties.ipConfigurations[{i}]"
            if not isinstance(ipc, dict):
                raise bad_content(path)
            ipc_name = ipc.get("name")
            if not isinstance(ipc_name, str) or not NRP_NAME_RE.fullmatch(ipc_name):
                raise ApiError(400, "InvalidRequestFormat", "Cannot parse the request.", details=[
                    {"code": "MissingJsonProperty", "message": f"Name is missing. Path {path}.name."}])
            p = obj(ipc, "properties", path + ".properties")
            subnet = p.get("subnet")
            if not isinstance(subnet, dict):
                raise ApiError(400, "InvalidRequestFormat", "Cannot parse the request.", details=[
                    {"code": "MissingJsonReferenceId",
                     "message": f"Value for reference id is missing. Path {path}.properties.subnet."}])
            if check_subnet_id(subnet.get("id"), path + ".properties.subnet") is None:
                raise ApiError(400, "InvalidResourceReference", f"Resource {subnet['id']} referenced by resource "
                               f"{nic_id} was not found. Please make sure that the referenced resource exists, and "
                               "that both resources are in the same region.", details=[])
            method = enum(p.get("privateIPAllocationMethod", "Dynamic"), ("Dynamic", "Static"),
                          "privateIPAllocationMethod")
            pip = p.get("publicIPAddress")
            pip_id = None
            if pip is not None:
                if not isinstance(pip, dict) or not isinstance(pip.get("id"), str) or not pip["id"]:
                    raise ApiError(400, "InvalidRequestFormat", "Cannot parse the request.", details=[
                        {"code": "MissingJsonReferenceId",
                         "message": f"Value for reference id is missing. Path {path}.properties.publicIPAddress."}])
                if not RESOURCE_ID_RE.fullmatch(pip["id"]):
                    raise linked_invalid_id(pip["id"], path + ".properties.publicIPAddress.id")
                if not PIP_ID_RE.fullmatch(pip["id"]):
                    raise ApiError(400, "InvalidResourceReference", f"Resource {pip['id']} referenced by resource "
                                   f"{nic_id} was not found. Please make sure that the referenced resource exists, "
                                   "and that both resources are in the same region.", details=[])
                pip_id = pip["id"]
            primary = typed(p, "primary", bool, path + ".properties.primary", len(raw_configs) == 1 or i == 0)
            primaries += bool(primary)
            prev = old.get(ipc_name.lower())
            if method == "Static":
                address = p.get("privateIPAddress")
                try:
                    ipaddress.IPv4Address(address)
                except (ipaddress.AddressValueError, ValueError):
                    raise ApiError(400, "PrivateIPAddressIsNotValid", f"Private static IP address {address} does not "
                                   f"belong to the range of subnet prefix of subnet {subnet['id']}.", details=[]) from None
            elif prev and prev["subnet"].lower() == subnet["id"].lower():
                address = prev["privateIPAddress"]
            else:
                address = self._private_ip(subnet["id"])
            ipconfigs.append({"name": ipc_name, "privateIPAddress": address, "privateIPAllocationMethod": method,
                              "subnet": subnet["id"], "primary": bool(primary), "publicIPAddress": pip_id})
        if primaries != 1:
            raise ApiError(400, "NetworkInterfaceMustHaveExactlyOnePrimaryIpConfiguration" if primaries else
                           "NetworkInterfaceMustHaveOnePrimaryIpConfiguration", f"Network interface {nic_id} must "
                           "have exactly one primary IP configuration.", details=[])
        extra = {}
        for flag in ("enableAcceleratedNetworking", "enableIPForwarding"):
            extra[flag] = typed(props, flag, bool, "properties." + flag, False)
        if existing:
            existing.tags, existing.ipconfigs, existing.extra = tags, ipconfigs, extra
            existing.etag = self._guid()
            nic, status = existing, 200
        else:
            nic = self.nics[key] = Nic(ctx.sub, ctx.m["rg"], name, location, tags, ipconfigs, self._guid(),
                                       self._guid(), extra)
            status = 201
        op = self._new_op("Microsoft.Network", ctx.sub, location, ctx.api, 1, "put")
        return Reply(status, self._nic_view(nic), {"Azure-AsyncOperation": self._network_op_url(ctx.base, op)})

    def nic_get(self, ctx):
        return Reply(200, self._nic_view(self._nic(ctx)))

    def nic_list(self, ctx):
        self._rg(ctx)
        scope = (ctx.sub.lower(), ctx.m["rg"].lower())
        nics = sorted((n for n in self.nics.values() if n.key[:2] == scope), key=lambda n: n.name.lower())
        page, token = self._page(ctx, nics, "networkInterfaces")
        body = {"value": [self._nic_view(n) for n in page]}
        if token:
            body["nextLink"] = (f"{ctx.base}/subscriptions/{ctx.sub}/resourceGroups/{ctx.m['rg']}/providers/"
                                f"Microsoft.Network/networkInterfaces?api-version={ctx.api}&$skiptoken={quote(token)}")
        return Reply(200, body)

    def nic_delete(self, ctx):
        self._rg(ctx)
        nic = self.nics.get((ctx.sub.lower(), ctx.m["rg"].lower(), ctx.m["name"].lower()))
        if not nic:
            return Reply(204, None)
        if nic.vm_id:
            raise nic_in_use(nic.id, nic.vm_id, deleting=True)
        if nic.reserved_until > time.time():
            raise nic_reserved(nic.reserved_for)
        if not nic.deleting:
            op = nic.deleting = self._new_op("Microsoft.Network", nic.sub, nic.location, ctx.api, 1, "delete")
            op.on_done = lambda: self.nics.pop(nic.key, None) and None
        op = nic.deleting
        return Reply(202, None, {"Azure-AsyncOperation": self._network_op_url(ctx.base, op),
                                 "Location": self._network_op_url(ctx.base, op, results=True)})

    # -- template specs ---------------------------------------------------------------------------

    def _system_data(self, created, modified):
        return {"createdBy": "fake-caller@example.com", "createdByType": "User", "createdAt": iso7z(created),
                "lastModifiedBy": "fake-caller@example.com", "lastModifiedByType": "User",
                "lastModifiedAt": iso7z(modified)}

    def _ts(self, ctx):
        self._rg(ctx)
        spec = self.specs.get((ctx.sub.lower(), ctx.m["rg"].lower(), ctx.m["ts"].lower()))
        if not spec:
            raise resource_not_found("Microsoft.Resources/templateSpecs", ctx.m["ts"], ctx.m["rg"])
        return spec

    def _ts_view(self, spec, expand=False):
        body = {"id": spec.id, "type": "Microsoft.Resources/templateSpecs", "name": spec.name,
                "location": spec.location, "systemData": self._system_data(*spec.system)}
        if spec.tags:
            body["tags"] = dict(spec.tags)
        props = copy.deepcopy(spec.props)
        if expand:
            props["versions"] = {v["name"]: {**({"description": v["props"]["description"]}
                                                if "description" in v["props"] else {}),
                                             "timeCreated": iso7z(v["system"][0]),
                                             "timeModified": iso7z(v["system"][1])}
                                 for v in spec.versions.values()}
        body["properties"] = props
        return body

    @staticmethod
    def _check_ts_name(name, what):
        if not TS_NAME_RE.fullmatch(name):
            raise ApiError(400, "InvalidParameter", f"The {what} '{name}' is invalid. It must be 1-90 characters of "
                           "letters, digits, '-', '_', '.', '(' or ')'.")

    @staticmethod
    def _ts_props(props, kinds):
        out = {}
        for key, kind, limit in kinds:
            if key not in props or props[key] is None:
                continue
            value = props[key]
            if not isinstance(value, kind):
                raise bad_content("properties." + key)
            if limit and len(value) > limit:
                raise invalid_parameter(f"The length of '{key}' exceeds the maximum of {limit} characters.", key)
            out[key] = copy.deepcopy(value)
        return out

    def ts_put(self, ctx):
        self._rg(ctx, write=True)
        name = ctx.m["ts"]
        self._check_ts_name(name, "template spec name")
        body = ctx.json()
        tags = validate_tags(body.get("tags"))
        location = validate_location(body.get("location"), "Microsoft.Resources/templateSpecs")
        props = self._ts_props(obj(body, "properties", "properties"),
                               (("description", str, 4096), ("displayName", str, 64), ("metadata", dict, None)))
        key = (ctx.sub.lower(), ctx.m["rg"].lower(), name.lower())
        spec = self.specs.get(key)
        now = time.time()
        if spec and spec.location != location:
            raise ApiError(400, "InvalidResourceLocation", f"The resource '{name}' already exists in location "
                           f"'{spec.location}' in resource group '{ctx.m['rg']}'. A resource with the same name cannot "
                           f"be created in location '{location}'. Please select a new resource name.")
        status = 200 if spec else 201
        if not spec:
            spec = self.specs[key] = TemplateSpec(ctx.sub, ctx.m["rg"], name, location)
            spec.system = (now, now)
        else:
            spec.system = (spec.system[0], now)
        spec.tags, spec.props = tags, props
        return Reply(status, self._ts_view(spec))

    def ts_get(self, ctx):
        expand = ctx.query.get("$expand")
        if expand is not None and expand != "versions":
            raise invalid_parameter(f"The value '{expand}' of parameter '$expand' is not allowed. Allowed values are "
                                    "'versions'.", "$expand")
        return Reply(200, self._ts_view(self._ts(ctx), expand == "versions"))

    def ts_delete(self, ctx):
        self._rg(ctx)
        key = (ctx.sub.lower(), ctx.m["rg"].lower(), ctx.m["ts"].lower())
        if self.specs.pop(key, None) is None:
            return Reply(204, None)
        return Reply(200, None)

    def _tsv_view(self, spec, v):
        body = {"id": f"{spec.id}/versions/{v['name']}", "type": "Microsoft.Resources/templateSpecs/versions",
                "name": v["name"], "location": spec.location, "systemData": self._system_data(*v["system"])}
        if v["tags"]:
            body["tags"] = dict(v["tags"])
        body["properties"] = copy.deepcopy(v["props"])
        return body

    def tsv_put(self, ctx):
        self._rg(ctx, write=True)
        spec = self.specs.get((ctx.sub.lower(), ctx.m["rg"].lower(), ctx.m["ts"].lower()))
        if not spec:
            raise ApiError(404, "ParentResourceNotFound", "Failed to perform 'write' on resource(s) of type "
                           "'templateSpecs/versions', because the parent resource "
                           f"'/subscriptions/{ctx.sub}/resourceGroups/{ctx.m['rg']}/providers/Microsoft.Resources/"
                           f"templateSpecs/{ctx.m['ts']}' could not be found.")
        name = ctx.m["ver"]
        self._check_ts_name(name, "template spec version")
        body = ctx.json()
        tags = validate_tags(body.get("tags"))
        location = validate_location(body.get("location"), "Microsoft.Resources/templateSpecs/versions")
        if location != spec.location:
            raise ApiError(400, "InvalidTemplateSpecVersionLocation", f"The location '{location}' of the template spec "
                           f"version does not match the location '{spec.location}' of the parent template spec.")
        if not isinstance(body.get("properties"), dict):
            raise required("properties")
        props = self._ts_props(body["properties"], (("description", str, 4096), ("metadata", dict, None),
                                                    ("mainTemplate", dict, None), ("uiFormDefinition", dict, None),
                                                    ("linkedTemplates", list, None)))
        if "mainTemplate" not in props:
            raise required("mainTemplate")
        if self.config["strict_template_validation"]:
            template = props["mainTemplate"]
            for field, kind in (("$schema", str), ("contentVersion", str), ("resources", (list, dict))):
                if not isinstance(template.get(field), kind):
                    raise ApiError(400, "InvalidTemplate", "Template validation failed: Required property "
                                   f"'{field}' not found in JSON. Path 'properties.mainTemplate'.")
        now = time.time()
        key = name.lower()
        prev = spec.versions.get(key)
        spec.versions[key] = {"name": prev["name"] if prev else name, "tags": tags, "props": props,
                              "system": (prev["system"][0] if prev else now, now)}
        return Reply(200 if prev else 201, self._tsv_view(spec, spec.versions[key]))

    def tsv_get(self, ctx):
        spec = self._ts(ctx)
        v = spec.versions.get(ctx.m["ver"].lower())
        if not v:
            raise resource_not_found("Microsoft.Resources/templateSpecs", f"{spec.name}/versions/{ctx.m['ver']}",
                                     ctx.m["rg"])
        return Reply(200, self._tsv_view(spec, v))

    def tsv_delete(self, ctx):
        self._rg(ctx)
        spec = self.specs.get((ctx.sub.lower(), ctx.m["rg"].lower(), ctx.m["ts"].lower()))
        if not spec or spec.versions.pop(ctx.m["ver"].lower(), None) is None:
            return Reply(204, None)
        return Reply(200, None)


# ---------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------

# ARM's throttling names the operation by its path template, upper case, names left out.
THROTTLE_PATHS = {
    "resourcegroups/{name}": "RESOURCEGROUPS",
    "operationresults/{id}": "OPERATIONRESULTS",
    "networkInterfaces": "RESOURCEGROUPS/PROVIDERS/MICROSOFT.NETWORK/NETWORKINTERFACES",
    "networkInterfaces/{name}": "RESOURCEGROUPS/PROVIDERS/MICROSOFT.NETWORK/NETWORKINTERFACES",
    "networkOperations/{id}": "PROVIDERS/MICROSOFT.NETWORK/LOCATIONS/OPERATIONS",
    "networkOperationResults/{id}": "PROVIDERS/MICROSOFT.NETWORK/LOCATIONS/OPERATIONRESULTS",
    "templateSpecs/{name}": "RESOURCEGROUPS/PROVIDERS/MICROSOFT.RESOURCES/TEMPLATESPECS",
    "templateSpecs/{name}/versions/{version}": "RESOURCEGROUPS/PROVIDERS/MICROSOFT.RESOURCES/TEMPLATESPECS/VERSIONS",
}


def throttled(method, family, template, sub):
    """429 as Compute answers it (for Compute routes) or as ARM's request throttling does."""
    if family == "compute":
        group = COMPUTE_THROTTLE_GROUPS.get(method, "GetOperation3Min" if template.startswith("operations")
                                            else "LowCostGet3Min")
        now = time.time()
        detail = json.dumps({"operationGroup": group, "startTime": iso7(now - 60), "endTime": iso7(now + 120),
                             "allowedRequestCount": 240, "measuredRequestCount": 241}, separators=(",", ":"))
        return ApiError(429, "OperationNotAllowed", "The server rejected the request because too many requests have "
                        "been received for this subscription.",
                        details=[{"code": "TooManyRequests", "target": group, "message": detail}],
                        headers={"Retry-After": "1"}, extra={"innererror": {"internalErrorCode":
                                                                            "TooManyRequestsReceived"}})
    op = f"{method}/SUBSCRIPTIONS/" + THROTTLE_PATHS.get(template, "RESOURCEGROUPS")
    return ApiError(429, "SubscriptionRequestsThrottled", f"Number of requests for subscription '{sub}' and "
                    f"operation '{op}' exceeded the backend storage limit. Please try again after '1' seconds.",
                    headers={"Retry-After": "1"})


def service_unavailable():
    return ApiError(503, "ServiceUnavailable", "The service is temporarily unavailable. Please retry the request.")


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-arm/1"

    def do_GET(self):
        self._dispatch("GET")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def log_message(self, fmt, *args):
        if getattr(self.server, "verbose", False):
            sys.stderr.write("fake_arm: " + fmt % args + "\n")

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

    def _send(self, status, body, headers, head=False):
        data = b""
        if body is not None:
            data = json.dumps(body, indent=1).encode() + b"\n"
        self.send_response(status)
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        self.send_header("x-ms-correlation-request-id", self.headers.get("x-ms-correlation-request-id")
                         or str(uuid.uuid4()))
        for key, value in headers.items():
            self.send_header(key, value)
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data and not head:
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
            self._send(status, payload, {})
            return
        route = match_route(url.path)
        template = route[0] if route else "unknown"
        backend.count(method, template)
        fault = backend.pick_fault(method)
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        head = method == "HEAD"
        if fault in ("429", "503"):
            sub = route[3].get("sub") if route else "unknown"
            err = throttled(method, route[1] if route else "resources", template, sub) if fault == "429" \
                else service_unavailable()
            self._send(err.status, None if head else err.body, err.headers, head)
            return
        try:
            reply = backend.handle(method, url.path, query, raw, self.headers, self.server.base_url)
            status, body, headers = reply.status, reply.body, reply.headers
        except ApiError as e:
            status, body, headers = e.status, e.body, e.headers
        if fault == "lost":
            self._drop()
            return
        self._send(status, None if head else body, headers, head)

    def _control(self, backend, method, path, raw):
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return 400, {"error": "body is not JSON"}
        if (method, path) == ("GET", "/_fake/config"):
            with backend.lock:
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
        if (method, path) == ("GET", "/_fake/vms"):
            return 200, backend.snapshot_vms()
        if (method, path) == ("GET", "/_fake/nics"):
            return 200, backend.snapshot_nics()
        if (method, path) == ("GET", "/_fake/disks"):
            return 200, backend.snapshot_disks()
        return 404, {"error": f"no control endpoint {method} {path}"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # parallel clients (bulk launches) must not meet a full backlog


class _Server6(_Server):
    address_family = socket.AF_INET6


class FakeArm:
    """The fake as an object, for tests: FakeArm().start(); .url; .backend; .stop()."""

    def __init__(self, host="127.0.0.1", port=0, seed=None, stage_ms=150, verbose=False):
        host = "127.0.0.1" if host == "localhost" else host
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"fake_arm binds loopback only, not {host}")
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
        self.server.base_url = self.url
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.1,), name="fake-arm", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)
            self.server = None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Stateful fake of Azure Resource Manager (VMs, NICs, resource "
                                                 "groups, template specs).")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port, 0 for any free one")
    parser.add_argument("--seed", type=int, default=None, help="seed for ids, addresses and faults")
    parser.add_argument("--stage-ms", type=int, default=150, help="time per operation stage (default 150)")
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    args = parser.parse_args(argv)
    try:
        fake = FakeArm(args.host, args.port, args.seed, args.stage_ms, args.verbose).start()
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
