"""Self-test of fake_arm: behaviour, refusals, and shapes against ../../testdata.

Run: cd providers/azure/tests/support && python3 -m unittest test_fake_arm -v
"""

import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import unittest
from urllib.parse import urlencode, urlsplit

from fake_arm import FakeArm

HERE = os.path.dirname(os.path.abspath(__file__))
TESTDATA = os.path.join(HERE, "..", "..", "testdata")
STAGE_MS = 40
SUB = "7c1b5a2e-0d4e-4d36-9a8c-1f2e3d4c5b6a"
RG = "motorpool-demo"
LOC = "westeurope"
COMPUTE_API = "2024-07-01"
NETWORK_API = "2024-05-01"
RG_API = "2022-09-01"
TS_API = "2022-02-01"
SUBNET = (f"/subscriptions/{SUB}/resourceGroups/motorpool-net/providers/Microsoft.Network/virtualNetworks/"
          "motorpool-vnet/subnets/nodes")
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGEOtbPCLEMjbdcpKgpW7LKFixCDhEIg2u2aRtinmWKr motorpool"
TOKEN = "Bearer eyJ0eXAiOiJKV1QifQ.fake.token"


def recorded(name):
    with open(os.path.join(TESTDATA, name)) as f:
        return json.load(f)


def json_type(value):
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


# Maps keyed by user data: their keys are not part of the shape.
DYNAMIC_MAPS = {"tags", "mainTemplate", "metadata", "parameters"}


def rg_path(rg=RG, sub=SUB):
    return f"/subscriptions/{sub}/resourcegroups/{rg}"


def vm_path(name="", rg=RG):
    base = f"/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines"
    return f"{base}/{name}" if name else base


def nic_path(name="", rg=RG):
    base = f"/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Network/networkInterfaces"
    return f"{base}/{name}" if name else base


def nic_id(name, rg=RG):
    return nic_path(name, rg)


def ts_path(name, version=None, rg=RG):
    base = f"/subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Resources/templateSpecs/{name}"
    return f"{base}/versions/{version}" if version else base


def vm_body(nics, size="Standard_D2s_v5", location=LOC, tags=None, custom_data=None, user_data=None,
            user="motorpool", **props):
    body = {
        "location": location,
        "properties": {
            "hardwareProfile": {"vmSize": size},
            "storageProfile": {
                "imageReference": {"publisher": "Canonical", "offer": "0001-com-ubuntu-server-jammy",
                                   "sku": "22_04-lts-gen2", "version": "latest"},
                "osDisk": {"createOption": "FromImage", "deleteOption": "Delete",
                           "managedDisk": {"storageAccountType": "Premium_LRS"}, "diskSizeGB": 30},
            },
            "osProfile": {
                "adminUsername": user,
                "linuxConfiguration": {"disablePasswordAuthentication": True, "ssh": {"publicKeys": [
                    {"path": f"/home/{user}/.ssh/authorized_keys", "keyData": SSH_KEY}]}},
            },
            "networkProfile": {"networkInterfaces": [
                {"id": n if n.startswith("/") else nic_id(n), "properties": {"primary": i == 0,
                                                                              "deleteOption": "Delete"}}
                for i, n in enumerate(nics)]},
        },
    }
    if tags is not None:
        body["tags"] = tags
    if custom_data is not None:
        body["properties"]["osProfile"]["customData"] = custom_data
    if user_data is not None:
        body["properties"]["userData"] = user_data
    body["properties"].update(props)
    return body


def nic_body(location=LOC, subnet=SUBNET, tags=None):
    body = {"location": location, "properties": {"ipConfigurations": [
        {"name": "ipconfig1", "properties": {"subnet": {"id": subnet}, "privateIPAllocationMethod": "Dynamic"}}]}}
    if tags is not None:
        body["tags"] = tags
    return body


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def header(self, name):
        for k, v in self.headers.items():
            if k.lower() == name.lower():
                return v
        return None


class FakeArmTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.fake = FakeArm(seed=7, stage_ms=STAGE_MS).start()
        cls.host, cls.port = urlsplit(cls.fake.url).hostname, urlsplit(cls.fake.url).port

    @classmethod
    def tearDownClass(cls):
        cls.fake.stop()

    def setUp(self):
        self.control("POST", "/_fake/reset")
        self.control("POST", "/_fake/config", {"stage_ms": STAGE_MS})

    # -- helpers ------------------------------------------------------------------

    def raw(self, method, path, body=None, headers=None, auth=True):
        """One request on a fresh connection."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            h = {"Authorization": TOKEN} if auth else {}
            h.update(headers or {})
            data = json.dumps(body) if body is not None else None
            if data is not None:
                h["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=h)
            resp = conn.getresponse()
            payload = resp.read()
            return Response(resp.status, dict(resp.getheaders()), json.loads(payload) if payload else None)
        finally:
            conn.close()

    def api(self, method, path, body=None, api=None, query=None, **kw):
        if api is None:
            api = (COMPUTE_API if "Microsoft.Compute" in path else NETWORK_API if "Microsoft.Network" in path
                   else TS_API if "templateSpecs" in path else RG_API)
        q = {"api-version": api} if api else {}
        q.update(query or {})
        sep = "&" if "?" in path else "?"
        return self.raw(method, path + (sep + urlencode(q) if q else ""), body, **kw)

    def control(self, method, path, body=None):
        r = self.raw(method, path, body, auth=False)
        return r.body

    def follow(self, url, **kw):
        """GET an absolute URL the fake handed out (it must be on the fake's own host:port)."""
        parts = urlsplit(url)
        self.assertEqual((parts.hostname, parts.port), (self.host, self.port), url)
        return self.raw("GET", parts.path + ("?" + parts.query if parts.query else ""), **kw)

    def assert_error(self, r, status, code):
        self.assertEqual(r.status, status, r.body)
        self.assertEqual(r.body["error"]["code"], code, r.body)
        return r.body["error"]

    def wait_op(self, url):
        for _ in range(100):
            r = self.follow(url)
            self.assertEqual(r.status, 200, r.body)
            if r.body["status"] != "InProgress":
                return r.body
            time.sleep(0.01)
        self.fail(f"operation {url} never finished")

    def make_rg(self, name=RG, location=LOC, **kw):
        r = self.api("PUT", rg_path(name), {"location": location, **kw})
        self.assertIn(r.status, (200, 201), r.body)
        return r

    def make_nic(self, name, **kw):
        r = self.api("PUT", nic_path(name), nic_body(**kw))
        self.assertEqual(r.status, 201, r.body)
        return r

    def make_vm(self, name, nics=None, wait=True, **kw):
        nics = nics or [f"{name}-nic"]
        for n in nics:
            if not n.startswith("/") and self.api("GET", nic_path(n)).status == 404:
                self.make_nic(n)
        r = self.api("PUT", vm_path(name), vm_body(nics, **kw))
        self.assertEqual(r.status, 201, r.body)
        if wait:
            done = self.wait_op(r.header("Azure-AsyncOperation"))
            self.assertEqual(done["status"], "Succeeded", done)
        return r

    def power(self, name):
        r = self.api("GET", vm_path(name) + "/instanceView")
        self.assertEqual(r.status, 200, r.body)
        return [s["code"] for s in r.body["statuses"] if s["code"].startswith("PowerState/")]

    def assert_shape(self, want, got, path="$"):
        """Every key of the recording is in the fake's answer, with the same JSON type."""
        self.assertEqual(json_type(got), json_type(want), f"{path}: {got!r} vs recorded {want!r}")
        last = path.rsplit(".", 1)[-1]
        if isinstance(want, dict) and last in DYNAMIC_MAPS:
            if want:
                self.assertTrue(got, f"{path}: empty, recording has entries")
            for key, value in got.items():
                peers = [w for w in want.values() if json_type(w) == json_type(value)]
                self.assertTrue(peers, f"{path}[{key}]: {value!r} matches no recorded value's type")
        elif isinstance(want, dict):
            for key, value in want.items():
                self.assertIn(key, got, f"{path}.{key} missing from the fake's answer")
                if key == "type":
                    self.assertEqual(got[key], value, f"{path}.type")
                self.assert_shape(value, got[key], f"{path}.{key}")
        elif isinstance(want, list):
            if want:
                self.assertTrue(got, f"{path}: empty, recording has entries")
            for i, (w, g) in enumerate(zip(want, got)):
                self.assert_shape(w, g, f"{path}[{i}]")

    # -- basics: auth, api-version, resource groups -------------------------------------

    def test_api_version_is_required_and_checked(self):
        r = self.api("GET", rg_path(), api="")
        err = self.assert_error(r, 400, "MissingApiVersionParameter")
        self.assertEqual(err["message"], "The api-version query parameter (?api-version=) is required for all requests.")
        self.assert_shape(recorded("error-missing-api-version.json"), r.body)
        self.assert_error(self.api("GET", vm_path("x"), api=""), 400, "MissingApiVersionParameter")
        err = self.assert_error(self.api("GET", rg_path(), api="2099-01-01"), 400, "InvalidApiVersionParameter")
        self.assertIn("2022-09-01", err["message"])
        self.make_rg()
        r = self.api("GET", vm_path("x"), api="2023-11-01")
        err = self.assert_error(r, 400, "NoRegisteredProviderFound")
        self.assertIn("for type 'virtualMachines'", err["message"])
        self.assertIn("2024-07-01", err["message"])
        self.assert_shape(recorded("error-no-registered-provider.json"), r.body)
        self.assertEqual(self.api("GET", vm_path(), api="2024-03-01").status, 200)

    def test_authentication_and_authorization(self):
        r = self.api("GET", rg_path(), auth=False)
        self.assert_error(r, 401, "AuthenticationFailed")
        self.assertIsNotNone(r.header("WWW-Authenticate"))
        self.assert_shape(recorded("error-authentication-failed.json"), r.body)
        self.assert_error(self.api("GET", rg_path(), headers={"Authorization": "Basic abc"}, auth=False), 401,
                          "AuthenticationFailedInvalidHeader")
        self.control("POST", "/_fake/config", {"deny_token": "denied"})
        r = self.api("PUT", rg_path(), {"location": LOC}, headers={"Authorization": "Bearer denied"}, auth=False)
        err = self.assert_error(r, 403, "AuthorizationFailed")
        self.assertIn("'Microsoft.Resources/subscriptions/resourcegroups/write' over scope "
                      f"'/subscriptions/{SUB}/resourcegroups/{RG}'", err["message"])
        self.assert_shape(recorded("error-authorization-failed.json"), r.body)
        self.assertEqual(self.api("PUT", rg_path(), {"location": LOC}).status, 201)  # other tokens pass

    def test_resource_groups(self):
        r = self.api("PUT", rg_path(), {"location": "West Europe", "tags": {"motorpool-cluster": "demo"}})
        self.assertEqual(r.status, 201, r.body)
        self.assert_shape(recorded("resource-group.json"), r.body)
        self.assertEqual(r.body["location"], "westeurope")
        self.assertEqual(self.api("PUT", rg_path(), {"location": LOC}).status, 200)
        self.assert_error(self.api("PUT", rg_path(), {"location": "eastus"}), 409, "InvalidResourceGroupLocation")
        self.assert_error(self.api("PUT", rg_path("x"), {"location": "marsnorth"}), 400,
                          "LocationNotAvailableForResourceGroup")
        self.assert_error(self.api("PUT", rg_path("x"), {}), 400, "LocationRequired")
        self.assertEqual(self.api("HEAD", rg_path()).status, 204)
        self.assertEqual(self.api("HEAD", rg_path("nope")).status, 404)
        # Paths are case-insensitive, names keep their first casing.
        r = self.api("GET", f"/SUBSCRIPTIONS/{SUB}/resourceGroups/MOTORPOOL-DEMO")
        self.assertEqual((r.status, r.body["name"]), (200, RG))
        r = self.api("GET", rg_path("nope"))
        self.assert_error(r, 404, "ResourceGroupNotFound")
        self.assert_shape(recorded("error-resource-group-not-found.json"), r.body)
        # Resources need their group.
        self.assert_error(self.api("PUT", vm_path("vm", rg="nope"), vm_body(["n"])), 404, "ResourceGroupNotFound")
        self.assert_error(self.api("PUT", nic_path("n", rg="nope"), nic_body()), 404, "ResourceGroupNotFound")
        self.assert_error(self.api("GET", rg_path(sub="not-a-guid")), 400, "InvalidSubscriptionId")

    def test_deleting_a_resource_group_takes_its_resources(self):
        self.make_rg()
        self.make_vm("vm-a")
        r = self.api("DELETE", rg_path())
        self.assertEqual(r.status, 202, r.body)
        location = r.header("Location")
        self.assertIn("/operationresults/", location)
        self.assertEqual(self.follow(location).status, 202)
        self.assertEqual(self.api("GET", rg_path()).body["properties"]["provisioningState"], "Deleting")
        self.assert_error(self.api("PUT", nic_path("late"), nic_body()), 409, "ResourceGroupBeingDeleted")
        time.sleep(STAGE_MS * 1.5 / 1000)
        self.assertEqual(self.follow(location).status, 200)
        self.assert_error(self.api("GET", rg_path()), 404, "ResourceGroupNotFound")
        self.assertEqual(self.control("GET", "/_fake/vms")["vms"], [])
        self.assertEqual(self.control("GET", "/_fake/nics")["nics"], [])
        self.assertEqual(self.control("GET", "/_fake/disks")["disks"], [])

    # -- VM lifecycle ------------------------------------------------------------------------

    def test_nic_and_vm_create_progress_to_running_in_real_shapes(self):
        self.make_rg()
        r = self.api("PUT", nic_path("mp-demo-worker-0001-nic"), nic_body())
        self.assertEqual(r.status, 201, r.body)
        self.assert_shape(recorded("network-interface.json"), r.body)
        self.assertRegex(r.body["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"],
                         r"^10\.0\.0\.\d+$")
        op = self.follow(r.header("Azure-AsyncOperation"))
        self.assertIn(op.body["status"], ("InProgress", "Succeeded"))
        self.assert_shape(recorded("network-operation-in-progress.json"), op.body)
        for _ in range(200):
            if op.body["status"] != "InProgress":
                break
            time.sleep(0.005)
            op = self.follow(r.header("Azure-AsyncOperation"))
        self.assertEqual(op.body, {"status": "Succeeded"})
        self.assert_shape(recorded("network-operation-succeeded.json"), op.body)

        user_data = base64.b64encode(b"role=worker\n").decode()
        custom = base64.b64encode(b"#cloud-config\nruncmd: [motorpool agent]\n").decode()
        r = self.api("PUT", vm_path("mp-demo-worker-0001"), vm_body(
            ["mp-demo-worker-0001-nic"], tags={"motorpool-cluster": "demo"}, custom_data=custom, user_data=user_data))
        self.assertEqual(r.status, 201, r.body)
        self.assertEqual(r.body["properties"]["provisioningState"], "Creating")
        self.assert_shape(recorded("vm-create-201.json"), r.body)
        self.assertNotIn("customData", r.body["properties"]["osProfile"])  # never returned
        async_url = r.header("Azure-AsyncOperation")
        self.assertRegex(async_url, rf"/subscriptions/{SUB}/providers/Microsoft\.Compute/locations/{LOC}/operations/"
                                    r"[0-9a-f-]{36}\?p=[0-9a-f-]{36}&api-version=2024-07-01$")
        self.assertIsNotNone(r.header("Retry-After"))
        self.assertIsNone(r.header("Location"))

        seen_ops, seen_power = [], set()
        for _ in range(200):
            op = self.follow(async_url).body
            seen_ops.append(op["status"])
            if op["status"] == "InProgress":
                self.assert_shape(recorded("compute-operation-in-progress.json"), op)
            seen_power.update(self.power("mp-demo-worker-0001"))
            if op["status"] != "InProgress":
                break
            time.sleep(0.005)
        self.assertEqual((seen_ops[0], seen_ops[-1]), ("InProgress", "Succeeded"))
        self.assertIn("PowerState/starting", seen_power)
        self.assert_shape(recorded("compute-operation-succeeded.json"), op)
        self.assertEqual(self.power("mp-demo-worker-0001"), ["PowerState/running"])

        r = self.api("GET", vm_path("mp-demo-worker-0001"))
        self.assertEqual(r.body["properties"]["provisioningState"], "Succeeded")
        self.assert_shape(recorded("vm-get.json"), r.body)
        self.assertNotIn("userData", r.body["properties"])
        r = self.api("GET", vm_path("mp-demo-worker-0001"), query={"$expand": "userData"})
        self.assertEqual(r.body["properties"]["userData"], user_data)
        r = self.api("GET", vm_path("mp-demo-worker-0001"), query={"$expand": "instanceView"})
        self.assertEqual(r.body["properties"]["instanceView"]["statuses"][-1]["code"], "PowerState/running")
        r = self.api("GET", vm_path("mp-demo-worker-0001") + "/instanceView")
        self.assert_shape(recorded("vm-instance-view.json"), r.body)
        r = self.api("GET", nic_path("mp-demo-worker-0001-nic"))
        self.assert_shape(recorded("network-interface-attached.json"), r.body)
        self.assertEqual(r.body["properties"]["virtualMachine"]["id"], vm_path("mp-demo-worker-0001"))

        vm = self.control("GET", "/_fake/vms")["vms"][0]
        self.assertEqual((vm["name"], vm["powerState"], vm["provisioningState"]),
                         ("mp-demo-worker-0001", "running", "Succeeded"))
        self.assertEqual(vm["customData"], "#cloud-config\nruncmd: [motorpool agent]\n")
        self.assertEqual(vm["userData"], "role=worker\n")
        self.assertEqual(vm["tags"], {"motorpool-cluster": "demo"})
        self.assertEqual(vm["nicIds"], [nic_id("mp-demo-worker-0001-nic")])
        self.assertRegex(vm["privateIp"], r"^10\.0\.0\.\d+$")
        counts = self.control("GET", "/_fake/requests")
        self.assertEqual(counts["PUT virtualMachines/{name}"], 1)
        self.assertGreaterEqual(counts["GET operations/{id}"], 2)

        r = self.api("GET", vm_path("nope"))
        self.assert_error(r, 404, "ResourceNotFound")
        self.assert_shape(recorded("error-resource-not-found.json"), r.body)

    def test_spot_vm_and_user_data_shape(self):
        self.make_rg()
        self.make_vm("mp-demo-spot-0001", priority="Spot", evictionPolicy="Delete", billingProfile={"maxPrice": -1},
                     user_data=base64.b64encode(b"x").decode())
        r = self.api("GET", vm_path("mp-demo-spot-0001"), query={"$expand": "userData"})
        self.assert_shape(recorded("vm-get-spot-userdata.json"), r.body)
        r = self.api("PUT", vm_path("regular"), vm_body(["n"], evictionPolicy="Delete"))
        self.assert_error(r, 400, "InvalidParameter")

    def test_vm_bodies_are_validated_as_compute_does(self):
        self.make_rg()
        self.make_nic("n")
        too_long = base64.b64encode(b"x" * 65536).decode()
        self.assertGreater(len(too_long), 87380)
        r = self.api("PUT", vm_path("vm"), vm_body(["n"], custom_data=too_long))
        err = self.assert_error(r, 400, "InvalidParameter")
        self.assertEqual(err["target"], "customData")
        self.assert_shape(recorded("error-custom-data.json"), r.body)
        at_limit = base64.b64encode(b"x" * 65535).decode()
        self.assertEqual(len(at_limit), 87380)
        self.assertEqual(self.api("PUT", vm_path("ok"), vm_body(["n"], custom_data=at_limit)).status, 201)
        self.api("DELETE", vm_path("ok"))
        time.sleep(STAGE_MS * 1.5 / 1000)
        self.make_nic("n")  # deleteOption Delete took it
        cases = [
            (vm_body(["n"], custom_data="not base64!"), "InvalidParameter", "customData"),
            (vm_body(["n"], size="Standard_Huge"), "InvalidParameter", "vmSize"),
            (vm_body(["n"], user="admin"), "InvalidParameter", "adminUsername"),
            (vm_body(["n"], user="root"), "InvalidParameter", "adminUsername"),
            (vm_body(["n"], location="marsnorth"), "LocationNotAvailableForResourceType", None),
            ({k: v for k, v in vm_body(["n"]).items() if k != "location"}, "LocationRequired", None),
        ]
        no_os = vm_body(["n"])
        del no_os["properties"]["osProfile"]
        cases.append((no_os, "InvalidParameter", "osProfile"))
        no_net = vm_body(["n"])
        del no_net["properties"]["networkProfile"]
        cases.append((no_net, "InvalidParameter", "networkProfile"))
        no_auth = vm_body(["n"])
        no_auth["properties"]["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"] = []
        cases.append((no_auth, "InvalidParameter", "linuxConfiguration"))
        bad_path = vm_body(["n"])
        bad_path["properties"]["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0]["path"] = "/root/.ssh/k"
        cases.append((bad_path, "InvalidParameter", "linuxConfiguration.ssh.publicKeys.path"))
        bad_nic_id = vm_body(["networkInterfaces/n"])
        cases.append((bad_nic_id, "LinkedInvalidPropertyId", None))
        inline = vm_body(["n"])
        inline["properties"]["networkProfile"] = {"networkInterfaceConfigurations": [
            {"name": "nic", "properties": {"primary": True, "ipConfigurations": [
                {"name": "ip", "properties": {"subnet": {"id": SUBNET}}}]}}]}
        cases.append((inline, "InvalidParameter", "networkProfile.networkApiVersion"))
        for body, code, target in cases:
            with self.subTest(code=code, target=target):
                err = self.assert_error(self.api("PUT", vm_path("vm"), body), 400, code)
                if target:
                    self.assertEqual(err.get("target"), target, err)
        for bad in ("_vm", "vm.", "vm-", "a" * 65, "vm@1", "vm;1", "vm+1"):
            with self.subTest(name=bad):
                self.assert_error(self.api("PUT", vm_path(bad), vm_body(["n"])), 400, "InvalidParameter")
        # Unknown properties are ignored, as ARM resource providers ignore them.
        odd = vm_body(["n"])
        odd["properties"]["colour"] = "blue"
        odd["colour"] = "blue"
        self.assertEqual(self.api("PUT", vm_path("odd"), odd).status, 201)
        # Inline NIC configurations with networkApiVersion create a NIC of their own.
        inline["properties"]["networkProfile"]["networkApiVersion"] = "2020-11-01"
        r = self.api("PUT", vm_path("inline"), inline)
        self.assertEqual(r.status, 201, r.body)
        self.assertEqual(r.body["properties"]["networkProfile"]["networkInterfaces"][0]["id"], nic_id("inline-nic"))
        self.assertEqual(self.api("GET", nic_path("inline-nic")).status, 200)

    def test_invalid_tags_are_refused(self):
        self.make_rg()
        self.make_nic("n")
        cases = [
            ({"a/b": "x"}, "InvalidTagNameCharacters"),
            ({"a<b": "x"}, "InvalidTagNameCharacters"),
            ({"50%": "x"}, "InvalidTagNameCharacters"),
            ({"k" * 513: "x"}, "InvalidTagName"),
            ({"k": "v" * 257}, "InvalidTagValueLength"),
            ({f"k{i}": "v" for i in range(51)}, "InvalidTags"),
        ]
        for tags, code in cases:
            with self.subTest(code=code):
                self.assert_error(self.api("PUT", vm_path("vm"), vm_body(["n"], tags=tags)), 400, code)
                self.assert_error(self.api("PUT", rg_path("other"), {"location": LOC, "tags": tags}), 400, code)
                self.assert_error(self.api("PUT", nic_path("other"), nic_body(tags=tags)), 400, code)
        ok = {f"k{i}": "v" * 256 for i in range(50)}
        self.assertEqual(self.api("PUT", vm_path("vm"), vm_body(["n"], tags=ok)).status, 201)

    def test_list_pages_with_next_links(self):
        self.make_rg()
        self.control("POST", "/_fake/config", {"page_size": 3})
        for i in range(7):
            self.make_vm(f"w-{i}", wait=False)
        names, pages = [], 0
        r = self.api("GET", vm_path())
        while True:
            self.assertEqual(r.status, 200, r.body)
            pages += 1
            self.assertLessEqual(len(r.body["value"]), 3)
            names += [vm["name"] for vm in r.body["value"]]
            if pages == 1:
                self.assert_shape(recorded("vm-list-page.json"), r.body)
            link = r.body.get("nextLink")
            if not link:
                break
            self.assertIn("$skiptoken=", link)
            r = self.follow(link)
        self.assertEqual(pages, 3)
        self.assertEqual(sorted(names), [f"w-{i}" for i in range(7)])
        self.assertEqual(self.control("GET", "/_fake/requests")["GET virtualMachines"], 3)
        self.assert_error(self.api("GET", vm_path(), query={"$skiptoken": "Zm9yZ2Vk"}), 400, "InvalidParameter")
        r = self.api("GET", nic_path())
        self.assertEqual(len(r.body["value"]), 3)
        self.assertIn("nextLink", r.body)

    def test_patch_replaces_tags_and_user_data(self):
        self.make_rg()
        self.make_vm("vm", tags={"a": "1", "b": "2"})
        etag = self.api("GET", vm_path("vm")).body["etag"]
        user_data = base64.b64encode(b"v2").decode()
        r = self.api("PATCH", vm_path("vm"), {"tags": {"c": "3"}, "properties": {"userData": user_data}})
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(r.body["properties"]["provisioningState"], "Updating")
        self.assertEqual(r.body["tags"], {"c": "3"})
        self.assertIsNone(r.header("Azure-AsyncOperation"))  # as recorded: CRP answered VM PATCH without it
        self.assertNotEqual(r.body["etag"], etag)
        time.sleep(STAGE_MS * 1.5 / 1000)
        self.assertEqual(self.api("GET", vm_path("vm")).body["properties"]["provisioningState"], "Succeeded")
        vm = self.control("GET", "/_fake/vms")["vms"][0]
        self.assertEqual((vm["tags"], vm["userData"]), ({"c": "3"}, "v2"))
        self.control("POST", "/_fake/config", {"patch_async_header": True})
        r = self.api("PATCH", vm_path("vm"), {"tags": {}})
        self.assertEqual(self.wait_op(r.header("Azure-AsyncOperation"))["status"], "Succeeded")
        self.assertNotIn("tags", self.api("GET", vm_path("vm")).body)
        self.assert_error(self.api("PATCH", vm_path("vm"), {"tags": {"a?": "x"}}), 400, "InvalidTagNameCharacters")
        r = self.api("PATCH", vm_path("vm"), {"properties": {"osProfile": {"customData": "eA=="}}})
        self.assert_error(r, 409, "PropertyChangeNotAllowed")
        self.assert_error(self.api("PATCH", vm_path("vm"), {"tags": {}}, headers={"If-Match": '"999"'}), 412,
                          "PreconditionFailed")
        r = self.api("PUT", vm_path("vm"), vm_body(["vm-nic"], custom_data=base64.b64encode(b"new").decode()))
        self.assert_error(r, 409, "PropertyChangeNotAllowed")
        r = self.api("PUT", vm_path("vm"), vm_body(["vm-nic"], tags={"z": "1"}))
        self.assertEqual((r.status, r.body["properties"]["provisioningState"]), (200, "Updating"))
        self.assertEqual(self.wait_op(r.header("Azure-AsyncOperation"))["status"], "Succeeded")

    def test_deallocate_and_start(self):
        self.make_rg()
        self.make_vm("vm")
        r = self.api("POST", vm_path("vm") + "/deallocate")
        self.assertEqual(r.status, 202, r.body)
        self.assertIsNone(r.body)
        for name in ("Azure-AsyncOperation", "Location", "Retry-After"):
            self.assertIsNotNone(r.header(name), name)
        self.assertIn("monitor=true", r.header("Location"))
        self.assertEqual(self.power("vm"), ["PowerState/deallocating"])
        self.assertEqual(self.api("GET", vm_path("vm")).body["properties"]["provisioningState"], "Updating")
        self.assertEqual(self.follow(r.header("Location")).status, 202)
        err = self.assert_error(self.api("POST", vm_path("vm") + "/start"), 409, "OperationNotAllowed")
        self.assertIn("'start'", err["message"])
        self.assertEqual(self.wait_op(r.header("Azure-AsyncOperation"))["status"], "Succeeded")
        done = self.follow(r.header("Location"))
        self.assertEqual((done.status, done.body), (200, None))
        self.assertEqual(self.power("vm"), ["PowerState/deallocated"])
        self.assert_error(self.api("POST", vm_path("vm") + "/restart"), 409, "OperationNotAllowed")
        self.assert_error(self.api("POST", vm_path("vm") + "/powerOff"), 409, "OperationNotAllowed")
        r = self.api("POST", vm_path("vm") + "/deallocate")  # already deallocated: accepted, nothing to do
        self.assertEqual(r.status, 202)
        time.sleep(0.01)
        r = self.api("POST", vm_path("vm") + "/start")
        self.assertEqual(r.status, 202, r.body)
        self.assertEqual(self.power("vm"), ["PowerState/starting"])
        self.assertEqual(self.wait_op(r.header("Azure-AsyncOperation"))["status"], "Succeeded")
        self.assertEqual(self.power("vm"), ["PowerState/running"])
        r = self.api("POST", vm_path("vm") + "/powerOff")
        self.wait_op(r.header("Azure-AsyncOperation"))
        self.assertEqual(self.power("vm"), ["PowerState/stopped"])
        r = self.api("POST", vm_path("vm") + "/start")
        self.wait_op(r.header("Azure-AsyncOperation"))
        r = self.api("POST", vm_path("vm") + "/restart")
        self.assertEqual(r.status, 202)
        self.wait_op(r.header("Azure-AsyncOperation"))
        self.assertEqual(self.power("vm"), ["PowerState/running"])
        self.assert_error(self.api("POST", vm_path("nope") + "/start"), 404, "ResourceNotFound")

    def test_delete_takes_nic_and_disk_with_delete_option(self):
        self.make_rg()
        self.make_nic("keep")
        self.make_vm("vm", nics=["vm-nic"])
        body = vm_body(["keep"])
        body["properties"]["networkProfile"]["networkInterfaces"][0]["properties"]["deleteOption"] = "Detach"
        body["properties"]["storageProfile"]["osDisk"]["deleteOption"] = "Detach"
        r = self.api("PUT", vm_path("vm2"), body)
        self.wait_op(r.header("Azure-AsyncOperation"))
        self.assertEqual(len(self.control("GET", "/_fake/disks")["disks"]), 2)
        for name in ("vm", "vm2"):
            r = self.api("DELETE", vm_path(name))
            self.assertEqual(r.status, 202, r.body)
            self.assertIsNotNone(r.header("Location"))
            self.assertEqual(self.api("GET", vm_path(name)).body["properties"]["provisioningState"], "Deleting")
            self.assert_error(self.api("POST", vm_path(name) + "/start"), 409, "OperationNotAllowed")
            self.assertEqual(self.wait_op(r.header("Azure-AsyncOperation"))["status"], "Succeeded")
            self.assert_error(self.api("GET", vm_path(name)), 404, "ResourceNotFound")
        nics = {n["name"]: n for n in self.control("GET", "/_fake/nics")["nics"]}
        self.assertEqual(list(nics), ["keep"])  # vm-nic had deleteOption Delete
        self.assertIsNone(nics["keep"]["attachedVm"])
        disks = self.control("GET", "/_fake/disks")["disks"]
        self.assertEqual(len(disks), 1)  # vm2's disk was Detach
        self.assertIsNone(disks[0]["vm"])
        self.assertEqual(self.api("DELETE", vm_path("vm")).status, 204)  # already gone
        self.assertNotIn("virtualMachine", self.api("GET", nic_path("keep")).body["properties"])

    def test_nic_in_use_is_refused(self):
        self.make_rg()
        self.make_vm("vm", nics=["shared"])
        r = self.api("DELETE", nic_path("shared"))
        self.assert_error(r, 400, "NicInUse")
        self.assertIn("In order to delete the network interface", r.body["error"]["message"])
        self.assert_shape(recorded("error-nic-in-use.json"), r.body)
        self.assert_error(self.api("PUT", vm_path("vm2"), vm_body(["shared"])), 400, "NicInUse")
        self.assert_error(self.api("PUT", vm_path("vm3"), vm_body(["missing"])), 404, "NotFound")
        self.make_nic("east", location="eastus")
        self.assert_error(self.api("PUT", vm_path("vm4"), vm_body(["east"])), 400, "InvalidParameter")
        r = self.api("DELETE", nic_path("east"))
        self.assertEqual(r.status, 202)
        self.assertIn("/operationResults/", r.header("Location"))
        self.assertEqual(self.wait_op(r.header("Azure-AsyncOperation"))["status"], "Succeeded")
        self.assertEqual(self.follow(r.header("Location")).status, 204)
        self.assertEqual(self.api("DELETE", nic_path("east")).status, 204)
        self.assert_error(self.api("PUT", nic_path("bad"), nic_body(subnet="subnets/nodes")), 400,
                          "LinkedInvalidPropertyId")
        vnet_only = SUBNET.rsplit("/subnets/", 1)[0]
        self.assert_error(self.api("PUT", nic_path("bad"), nic_body(subnet=vnet_only)), 400,
                          "InvalidResourceReference")

    def test_nic_stays_reserved_after_its_vm_is_deleted(self):
        self.make_rg()
        self.control("POST", "/_fake/config", {"nic_reservation_ms": 300})
        body = vm_body(["n"])
        body["properties"]["networkProfile"]["networkInterfaces"][0]["properties"]["deleteOption"] = "Detach"
        self.make_nic("n")
        r = self.api("PUT", vm_path("vm"), body)
        self.wait_op(r.header("Azure-AsyncOperation"))
        r = self.api("DELETE", vm_path("vm"))
        self.wait_op(r.header("Azure-AsyncOperation"))
        r = self.api("DELETE", nic_path("n"))
        self.assert_error(r, 400, "NicReservedForAnotherVm")
        self.assertIn(vm_path("vm"), r.body["error"]["message"])
        self.assert_shape(recorded("error-nic-reserved.json"), r.body)
        self.assert_error(self.api("PUT", vm_path("other"), vm_body(["n"])), 400, "NicReservedForAnotherVm")
        nic = self.control("GET", "/_fake/nics")["nics"][0]
        self.assertEqual(nic["reservedFor"], vm_path("vm"))
        time.sleep(0.35)
        self.assertEqual(self.api("DELETE", nic_path("n")).status, 202)

    # -- quota, capacity, faults -------------------------------------------------------------

    def test_quota_is_checked_synchronously(self):
        self.make_rg()
        self.control("POST", "/_fake/config", {"core_quota": {LOC: 10}})
        for i in range(4):
            self.make_vm(f"w-{i}", wait=False)  # 4 x 2 = 8 vCPUs
        self.make_nic("big-nic")
        r = self.api("PUT", vm_path("big"), vm_body(["big-nic"], size="Standard_D4s_v5"))
        err = self.assert_error(r, 409, "OperationNotAllowed")
        self.assertIn("Operation could not be completed as it results in exceeding approved Total Regional Cores "
                      "quota. Additional details - Deployment Model: Resource Manager, Location: westeurope, Current "
                      "Limit: 10, Current Usage: 8, Additional Required: 4, (Minimum) New Limit Required: 12.",
                      err["message"])
        self.assert_shape(recorded("error-quota-exceeded.json"), r.body)
        self.assertEqual(self.api("GET", vm_path("big")).status, 404)  # nothing was made
        # Deallocated VMs do not count; starting one again is checked too.
        time.sleep(STAGE_MS * 2.5 / 1000)
        r = self.api("POST", vm_path("w-0") + "/deallocate")
        self.wait_op(r.header("Azure-AsyncOperation"))
        r = self.api("PUT", vm_path("big"), vm_body(["big-nic"], size="Standard_D4s_v5"))
        self.assertEqual(r.status, 201, r.body)
        self.assert_error(self.api("POST", vm_path("w-0") + "/start"), 409, "OperationNotAllowed")
        # Spot VMs use their own quota.
        self.control("POST", "/_fake/config", {"spot_core_quota": {LOC: 2}})
        self.make_vm("spot-1", priority="Spot", wait=False)
        self.make_nic("spot-2-nic")
        r = self.api("PUT", vm_path("spot-2"), vm_body(["spot-2-nic"], priority="Spot"))
        self.assertIn("LowPriorityCores", self.assert_error(r, 409, "OperationNotAllowed")["message"])

    def test_unavailable_size_is_refused_synchronously(self):
        self.make_rg()
        self.make_nic("n")
        self.control("POST", "/_fake/config", {"unavailable_sizes": ["Standard_D2s_v5"]})
        r = self.api("PUT", vm_path("vm"), vm_body(["n"]))
        err = self.assert_error(r, 409, "SkuNotAvailable")
        self.assertIn("Standard_D2s_v5' is currently not available in location 'westeurope'", err["message"])
        self.assert_shape(recorded("error-sku-not-available.json"), r.body)
        self.assertEqual(self.api("PUT", vm_path("vm"), vm_body(["n"], size="Standard_F2s_v2")).status, 201)

    def test_allocation_failure_fails_the_operation_and_leaves_a_failed_vm(self):
        self.make_rg()
        self.control("POST", "/_fake/config", {"allocation_failures": ["Standard_D4s_v5"]})
        r = self.make_vm("vm", size="Standard_D4s_v5", wait=False)
        done = self.wait_op(r.header("Azure-AsyncOperation"))
        self.assertEqual(done["status"], "Failed")
        self.assertEqual(done["error"]["code"], "AllocationFailed")
        self.assert_shape(recorded("compute-operation-failed-allocation.json"), done)
        r = self.api("GET", vm_path("vm"))
        self.assertEqual(r.body["properties"]["provisioningState"], "Failed")
        view = self.api("GET", vm_path("vm") + "/instanceView").body
        self.assertEqual(view["statuses"][0]["code"], "ProvisioningState/failed/AllocationFailed")
        vm = self.control("GET", "/_fake/vms")["vms"][0]
        self.assertEqual((vm["provisioningState"], vm["powerState"]), ("Failed", None))
        # The failed VM keeps its NIC until it is deleted.
        self.assert_error(self.api("DELETE", nic_path("vm-nic")), 400, "NicInUse")
        r = self.api("DELETE", vm_path("vm"))
        self.assertEqual(self.wait_op(r.header("Azure-AsyncOperation"))["status"], "Succeeded")
        self.assertEqual(self.control("GET", "/_fake/vms")["vms"], [])

    def test_rate_limit_and_unavailable_faults(self):
        self.make_rg()
        self.control("POST", "/_fake/config", {"faults": {"rate": 1.0, "kinds": ["429"], "methods": ["GET"]}})
        r = self.api("GET", vm_path())
        err = self.assert_error(r, 429, "OperationNotAllowed")
        self.assertEqual(r.header("Retry-After"), "1")
        self.assertEqual(err["details"][0]["code"], "TooManyRequests")
        self.assert_shape(recorded("error-throttled-compute.json"), r.body)
        r = self.api("GET", nic_path())
        self.assert_error(r, 429, "SubscriptionRequestsThrottled")
        self.assertEqual(r.header("Retry-After"), "1")
        self.control("POST", "/_fake/config", {"faults": {"kinds": ["503"]}})
        self.assert_error(self.api("GET", vm_path()), 503, "ServiceUnavailable")
        self.control("POST", "/_fake/config", {"faults": {"rate": 0}})
        self.assertEqual(self.api("GET", vm_path()).status, 200)
        counts = self.control("GET", "/_fake/requests")
        self.assertEqual(counts["GET virtualMachines"], 3)
        self.assertEqual(counts["GET networkInterfaces"], 1)
        self.assertEqual(self.control("GET", "/_fake/config")["faults"]["rate"], 0)  # /_fake/ is never faulted

    def test_lost_fault_does_the_work_and_drops_the_answer(self):
        self.make_rg()
        self.make_nic("n")
        self.control("POST", "/_fake/config", {"faults": {"rate": 1.0, "kinds": ["lost"], "methods": ["PUT"]}})
        with self.assertRaises((http.client.HTTPException, ConnectionError)):
            self.api("PUT", vm_path("ghost"), vm_body(["n"]))
        self.control("POST", "/_fake/config", {"faults": {"rate": 0.0}})
        r = self.api("GET", vm_path("ghost"))
        self.assertEqual(r.status, 200, r.body)
        # A retry of the same PUT is an update of the VM the lost request made.
        r = self.api("PUT", vm_path("ghost"), vm_body(["n"]))
        self.assertEqual(r.status, 200, r.body)

    # -- template specs -------------------------------------------------------------------------

    def test_template_spec_versions(self):
        self.make_rg()
        r = self.api("PUT", ts_path("motorpool-demo"), {"location": LOC, "properties": {"description": "d"}})
        self.assertEqual(r.status, 201, r.body)
        self.assert_shape(recorded("template-spec.json"), r.body)
        doc = {"cluster": "demo", "nodes": 3}
        version = {"location": LOC, "properties": {
            "description": "cluster document",
            "metadata": {"motorpool": json.dumps(doc)},
            "mainTemplate": {"$schema": "https://schema.management.azure.com/schemas/2019-04-01/"
                                        "deploymentTemplate.json#", "contentVersion": "1.0.0.0", "resources": []}}}
        r = self.api("PUT", ts_path("motorpool-demo", "v1"), version)
        self.assertEqual(r.status, 201, r.body)
        self.assert_shape(recorded("template-spec-version.json"), r.body)
        r = self.api("GET", ts_path("motorpool-demo", "v1"))
        self.assertEqual(json.loads(r.body["properties"]["metadata"]["motorpool"]), doc)
        self.assertEqual(self.api("PUT", ts_path("motorpool-demo", "v1"), version).status, 200)
        r = self.api("GET", ts_path("motorpool-demo"), query={"$expand": "versions"})
        self.assertEqual(list(r.body["properties"]["versions"]), ["v1"])
        self.assertEqual(self.api("DELETE", ts_path("motorpool-demo", "v1")).status, 200)
        self.assert_error(self.api("GET", ts_path("motorpool-demo", "v1")), 404, "ResourceNotFound")
        self.assertEqual(self.api("DELETE", ts_path("motorpool-demo", "v1")).status, 204)
        # Refusals: no parent, other location, a mainTemplate that is not a template, no api-version support.
        self.assert_error(self.api("PUT", ts_path("nope", "v1"), version), 404, "ParentResourceNotFound")
        self.assert_error(self.api("PUT", ts_path("motorpool-demo", "v2"), {**version, "location": "eastus"}), 400,
                          "InvalidTemplateSpecVersionLocation")
        bad = json.loads(json.dumps(version))
        bad["properties"]["mainTemplate"] = doc
        self.assert_error(self.api("PUT", ts_path("motorpool-demo", "v2"), bad), 400, "InvalidTemplate")
        bad["properties"]["mainTemplate"] = json.dumps(doc)  # a string is not an object
        self.assert_error(self.api("PUT", ts_path("motorpool-demo", "v2"), bad), 400, "InvalidRequestContent")
        self.assert_error(self.api("GET", ts_path("missing")), 404, "ResourceNotFound")
        self.assert_error(self.api("GET", ts_path("motorpool-demo"), api="2021-05-01"), 400,
                          "NoRegisteredProviderFound")
        self.assertEqual(self.api("DELETE", ts_path("motorpool-demo")).status, 200)
        self.assertEqual(self.api("DELETE", ts_path("motorpool-demo")).status, 204)

    def test_control_api_refuses_bad_config(self):
        for bad in ({"stage_ms": -1}, {"core_quota": {"marsnorth": 3}}, {"unavailable_sizes": ["Standard_Huge"]},
                    {"faults": {"kinds": ["404"]}}, {"page_size": 0}, {"colour": 1}, {"deny_token": ""}):
            with self.subTest(config=bad):
                r = self.raw("POST", "/_fake/config", bad, auth=False)
                self.assertEqual(r.status, 400, bad)


class CommandLineTest(unittest.TestCase):
    def test_prints_one_line_and_exits_cleanly_on_sigterm(self):
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "fake_arm.py"), "--port", "0", "--seed", "1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            self.assertRegex(line, r"^listening on http://127\.0\.0\.1:[0-9]+\n$")
            port = int(line.rsplit(":", 1)[1])
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", f"/subscriptions/{SUB}/resourcegroups/x?api-version={RG_API}",
                         headers={"Authorization": TOKEN})
            self.assertEqual(conn.getresponse().status, 404)
            conn.close()
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(timeout=5), 0)
            self.assertEqual(proc.stdout.read(), "")
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            proc.stderr.close()

    def test_refuses_a_non_loopback_host(self):
        proc = subprocess.run([sys.executable, os.path.join(HERE, "fake_arm.py"), "--host", "0.0.0.0"],
                              capture_output=True, text=True, timeout=10)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("loopback", proc.stderr)


if __name__ == "__main__":
    unittest.main()
