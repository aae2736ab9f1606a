"""Real podman (Debian's, as root) with mergefs as the overlay driver's mount_program.

Each mount program gets its own private storage (graphroot/runroot under a
temp dir) and loads an image built offline (umoci + busybox-static: a
whiteout, an opaque dir, a dir replaced by a file). The same tests run with
fuse-overlayfs as the mount program: they check the check. After every
``podman rm`` / ``podman image rm`` no FUSE mount and no podman, conmon or
mount server process naming the storage may be left. ``mergefs-fork`` and
``mergefs-views`` are mergefs through a mount service that the fixture
starts on private paths (``mergefs mount-server``, ``mergefs views serve``;
the lean program of ``mergefs views install-program``, ``mountopt =
"service=SOCK"``): there nothing may be left either (no forked server; no
view, no bind).
"""
from __future__ import annotations

import json
import os
import time

import pytest

from mergefs.testing.podman import PodmanEnv, busybox_image
from mergefs.testing.services import MountService, program

from ..conftest import needs, require

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    needs("root", "podman", "runc", "umoci", "busybox"),
]
PROGRAMS = ["mergefs", "mergefs-fork", "mergefs-views", "fuse-overlayfs"]
LOOK = ("cat /etc/motd; ls /data/keep; cat /data/old; "
        "test -e /gone && echo gone-visible || echo gone-hidden; cat /data/new; ls /")
IMAGE_VIEW = ("layer two\nc\na file now\ngone-hidden\nnew\n"
              "bin\ndata\ndev\netc\nproc\nroot\nrun\nsys\ntmp\n")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return busybox_image(tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="module", params=PROGRAMS)
def podman(request, tmp_path_factory, archive):
    if request.param == "fuse-overlayfs":
        require("fuse-overlayfs")
    root = tmp_path_factory.mktemp(f"podman-{request.param}")
    service = None
    if request.param in ("mergefs-fork", "mergefs-views"):
        service = MountService(request.param.split("-")[1], tmp_path_factory.mktemp("service"))
        env = PodmanEnv(root, request.param, program(root),
                        mountopt=f"service={service.control}")
    else:
        env = PodmanEnv(root, request.param)
    env.service = service
    try:
        env.image = env.load(archive)
        yield env
    finally:
        try:
            env.close()
            assert not env.mounts(fs_only=False) and not env.processes()
            if service is not None:
                assert service.wait_empty() == []
                assert service.errors() == []
        finally:
            if service is not None:
                service.stop()


def assert_nothing_left(podman: PodmanEnv) -> None:
    mounts, procs = podman.leftovers()
    assert not mounts and not procs, f"{podman.name}: left {mounts} {procs}"
    if podman.service is not None:       # no view, no forked server left
        assert podman.service.wait_empty() == []


def binds_made(podman: PodmanEnv) -> int:
    """How many mounts the service has made (0 without one)."""
    if podman.service is None:
        return 0
    text = podman.service.log.read_text()
    return text.count(" bound at ") + text.count(" INFO mounted ")


def test_run_shows_the_image_merged(podman):
    before = binds_made(podman)
    r = podman("run", "--rm", podman.image, "sh", "-c", LOOK + "; ls /data/old/x", check=False)
    assert (r.returncode, r.stdout) == (1, IMAGE_VIEW)
    assert r.stderr == "ls: /data/old/x: Not a directory\n"
    assert_nothing_left(podman)
    assert binds_made(podman) == before + (podman.service is not None)


def test_container_writes_stay_in_the_container(podman):
    name = f"w-{podman.name}"
    podman("run", "--name", name, podman.image, "sh", "-c",
           "echo changed > /etc/motd; rm /data/keep/c; rm -r /data/new; mkdir -p /data/keep/sub;"
           " echo s > /data/keep/sub/s; rm /data/old; mkdir /data/old; echo z > /data/old/z")
    # containers/storage reads the container's upper: whiteouts, opaque dir, replaced file
    assert sorted(podman("diff", name).stdout.splitlines()) == sorted([
        "C /data", "C /data/keep", "A /data/keep/sub", "A /data/keep/sub/s", "D /data/keep/c",
        "C /data/old", "A /data/old/z", "D /data/new", "C /etc", "C /etc/motd"])
    again = podman("start", "--attach", name).stdout      # the same upper, mounted again
    assert again == ""
    look = podman("run", "--rm", podman.image, "sh", "-c", LOOK).stdout
    assert look == IMAGE_VIEW                              # nothing leaked into the image
    podman("rm", name)
    assert_nothing_left(podman)


def test_a_non_root_container_user_gets_in(podman):
    """The mount is the rootfs of a container whose process is not root: as
    fuse-overlayfs does as root, the mount program lets other users in."""
    r = podman("run", "--rm", "--user", "65534:65534", podman.image, "sh", "-c",
               "id -u; cat /etc/motd; echo x > /tmp/mine; stat -c %u /tmp/mine; "
               "echo y > /etc/motd", check=False)
    assert r.stdout == "65534\nlayer two\n65534\n", r.stderr
    assert "Permission denied" in r.stderr and r.returncode == 1
    assert_nothing_left(podman)


CONTAINERFILE = """\
FROM {image}
RUN mkdir /made && echo one > /made/f && echo extra >> /etc/motd && rm /data/keep/c && rm -r /data/new
RUN echo two >> /made/f && rm /etc/group && rm -r /data/keep && mkdir /data/keep && echo fresh > /data/keep/fresh
RUN cat /made/f > /made/g && rm /made/f && rm /data/old && mkdir /data/old && echo in > /data/old/in
"""


def test_build_with_run_steps_then_run_the_built_image(podman, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(CONTAINERFILE.format(image=podman.image))
    tag = f"localhost/built-{podman.name}"
    before = binds_made(podman)
    podman("build", "--network", "none", "--tag", tag, ctx)
    if podman.service is not None:        # a working container per RUN step at least
        assert binds_made(podman) >= before + 3
    r = podman("run", "--rm", tag, "sh", "-c",
               "cat /etc/motd; ls /made; cat /made/g; ls /data/keep; ls /data/old; "
               "test -e /etc/group || echo no-group; ls /data; ls /etc")
    assert r.stdout == ("layer two\nextra\ng\none\ntwo\nfresh\nin\nno-group\nkeep\nold\n"
                        "hostname\nhosts\nmotd\nmtab\npasswd\n"), r.stdout
    # four layers for the build: the image's three and one per RUN step
    layers = podman("image", "inspect", "--format", "{{len .RootFS.Layers}}", tag).stdout
    assert layers.strip() == "6"
    podman("image", "rm", tag)
    assert_nothing_left(podman)
    assert podman("run", "--rm", podman.image, "sh", "-c", LOOK).stdout == IMAGE_VIEW


PLAIN_CONTAINERFILE = """\
FROM {image}
RUN mkdir /made && echo one > /made/f && echo extra >> /etc/motd
RUN echo two > /made/g && rm /etc/group
RUN echo three > /made/h
"""
# each step's layer as containers/storage stores it with a mount program (.wh. whiteouts);
# the first also holds the mount points buildah made for the step (/etc/hostname, /run)
STEP_LAYERS = [{"etc", "etc/motd", "made", "made/f", "etc/hostname", "run"},
               {"etc", "etc/.wh.group", "made", "made/g"},
               {"made", "made/h"}]


@pytest.fixture(scope="module")
def plain_archive(tmp_path_factory):
    return busybox_image(tmp_path_factory.mktemp("plain"), "mergefs-plain", plain=True)


def _files(diff: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), diff)
            for d, dirs, files in os.walk(diff) for n in dirs + files}


def test_build_commits_only_what_each_step_changed(podman, plain_archive, tmp_path):
    """containers/storage diffs a step with a mount program by walking the parent
    layers' mount beside the container's (its naive diff). Over a plain image
    mergefs has the kernel mount the parents (the first two steps here; the third
    step's parent holds a whiteout, so FUSE): either way each layer must hold the
    step's changes only, as with fuse-overlayfs; anything the two mounts showed
    differently (a time, an owner, a size) would land in the layer."""
    image = podman.load(plain_archive)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(PLAIN_CONTAINERFILE.format(image=image))
    tag = f"localhost/plain-{podman.name}"
    podman("build", "--network", "none", "--tag", tag, ctx)
    data = json.loads(podman("image", "inspect", "--format", "{{json .GraphDriver.Data}}",
                             tag).stdout)
    diffs = [data["UpperDir"]] + data["LowerDir"].split(":")[:2]
    assert [_files(d) for d in reversed(diffs)] == STEP_LAYERS
    r = podman("run", "--rm", tag, "sh", "-c", "cat /made/f /made/g /made/h /etc/motd; "
               "test -e /etc/group || echo no-group")
    assert r.stdout == "one\ntwo\nthree\nlayer one\nextra\nno-group\n"
    podman("image", "rm", tag, image)
    assert_nothing_left(podman)


def test_image_mount_of_a_plain_image(podman, plain_archive):
    """``podman image mount`` is a read-only mount with no upper: over a plain
    image mergefs hands it to the kernel's overlayfs (a read-only bind for its one
    layer), no server; ``image unmount`` (fusermount3 -u fails, then umount)
    leaves nothing."""
    image = podman.load(plain_archive)
    where = podman("image", "mount", image).stdout.strip()
    fstype = next(l.split()[2] for l in open("/proc/self/mounts") if l.split()[1] == where)
    if podman.name.startswith("mergefs"):
        assert not fstype.startswith("fuse")
        with pytest.raises(OSError):
            open(os.path.join(where, "etc/new"), "w").close()
    else:
        assert fstype == "fuse.fuse-overlayfs"
    with open(os.path.join(where, "etc/motd")) as f:
        assert f.read() == "layer one\n"
    podman("image", "unmount", image)
    podman("image", "rm", image)
    assert_nothing_left(podman)


def test_a_long_storage_path_still_gets_conmons_cleanup(tmp_path_factory, archive):
    """conmon's exit command is ``podman --runroot R ... container cleanup ID`` and
    podman refuses a ``--runroot`` longer than 50 characters: with a runroot that
    long the cleanup never ran, the container stayed "stopped" with its rootfs
    mounted, and ``podman run --rm`` waited out its 20 s conmon timeout. PodmanEnv
    keeps the runroot short whatever its root."""
    root = tmp_path_factory.mktemp("a-storage-root-whose-path-is-long-enough" + "x" * 20)
    assert len(f"{root}/run") > 50
    env = PodmanEnv(root, "kernel")
    try:
        image = env.load(archive)
        cid = env("run", "-d", image, "true").stdout.strip()
        env("wait", cid)
        state, mounts = "", None
        for _ in range(50):     # the exit command runs just after conmon sees the exit
            state = env("inspect", "--format", "{{.State.Status}}", cid).stdout.strip()
            mounts = env.mounts()
            if state == "exited" and not mounts:
                break
            time.sleep(0.2)
        assert (state, mounts) == ("exited", [])
        env("rm", cid)
    finally:
        env.close()
        assert not env.mounts(fs_only=False) and not env.processes()
