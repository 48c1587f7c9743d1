#!/usr/bin/env python3
"""Makes the hostile-layer corpus: one real tar per layer per case, and cases.json.

Usage: testdata/make-hostile-layers.py [--arena DIR] OUTDIR

Each case is a list of layers (tars written with raw header names, so `..`, absolute names,
symlinks, hardlinks, whiteouts and device nodes are all possible) and the outcome an unpacker
must give:

- "refused": the unpack fails; the error names the layer (by index here, by digest in the
  error) and the entry, and contains `why`. The target must not exist afterwards.
- "tree": the unpack succeeds and the root holds exactly the listed entries (path, type, mode,
  content or symlink target, link count, and for hardlinks the path it shares an inode with).
  Directories not listed in a layer are made with mode 0755 (the unpacker's, under umask 022).

The cases assume the target root is ARENA/root (the unpacker's temporary sibling is in ARENA
too), with the sentinels listed in cases.json beside it, writable by the user running the
unpack: an entry that escaped would land on them. Relative escapes (`../outside`) aim at ARENA
from the root; absolute ones (symlink targets, names, hardlink targets) name ARENA's absolute
path, so they depend on --arena (default /lathe-hostile-arena). Escape attempts are of two
kinds: those refused outright (names or hardlink targets climbing out with `..`, hardlinks to
what is not in the root, writes through a dangling symlink pointing out) and those contained
(absolute names are root-relative; symlinks resolve inside the root, as with openat2
RESOLVE_IN_ROOT, umoci and containerd, so a write "through" a symlink pointing out lands
inside the root and never on a sentinel).

The output depends only on the arguments: fixed mtimes, owners 0:0 with empty names, GNU tar
format (long names as ././@LongLink), sorted JSON.
"""

import argparse
import io
import json
import os
import sys
import tarfile

MTIME = 315532801  # 1980-01-01T00:00:01Z, the mtime lathe's layer writer uses
PWNED = "pwned"


class Layer:
    """One layer's entries, in order, written as a GNU tar with raw names."""

    def __init__(self):
        self.members = []

    def _add(self, name, kind, mode, data=b"", link="", dev=(0, 0)):
        info = tarfile.TarInfo()
        info.name = name  # raw: tarfile writes it as given (directories get a trailing /)
        info.type = kind
        info.mode = mode
        info.mtime = MTIME
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.linkname = link
        info.size = len(data)
        info.devmajor, info.devminor = dev
        self.members.append((info, data))
        return self

    def dir(self, name, mode=0o755):
        return self._add(name, tarfile.DIRTYPE, mode)

    def file(self, name, data="", mode=0o644):
        return self._add(name, tarfile.REGTYPE, mode, data.encode())

    def symlink(self, name, target):
        return self._add(name, tarfile.SYMTYPE, 0o777, link=target)

    def hardlink(self, name, target):
        return self._add(name, tarfile.LNKTYPE, 0o644, link=target)

    def fifo(self, name, mode=0o644):
        return self._add(name, tarfile.FIFOTYPE, mode)

    def chardev(self, name, major, minor, mode=0o666):
        return self._add(name, tarfile.CHRTYPE, mode, dev=(major, minor))

    def blockdev(self, name, major, minor, mode=0o660):
        return self._add(name, tarfile.BLKTYPE, mode, dev=(major, minor))

    def tar(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for info, data in self.members:
                tar.addfile(info, io.BytesIO(data) if data else None)
        return buf.getvalue()


# Expected tree entries.
def D(path, mode=0o755):
    return {"path": path, "type": "dir", "mode": f"{mode:04o}"}


def F(path, content="", mode=0o644, nlink=1, same_as=None):
    e = {"path": path, "type": "file", "mode": f"{mode:04o}", "content": content, "nlink": nlink}
    if same_as:
        e["same_as"] = same_as
    return e


def L(path, target, nlink=1, same_as=None):
    e = {"path": path, "type": "symlink", "target": target, "nlink": nlink}
    if same_as:
        e["same_as"] = same_as
    return e


def P(path, mode=0o644):
    return {"path": path, "type": "fifo", "mode": f"{mode:04o}", "nlink": 1}


def parents(path):
    """Directory entries (0755) for every proper prefix of `path`."""
    parts = path.split("/")[:-1]
    return [D("/".join(parts[: i + 1])) for i in range(len(parts))]


def refused(layer, entry, why):
    return {"refused": {"layer": layer, "entry": entry, "why": why}}


def tree(*entries):
    flat = []
    for e in entries:
        flat.extend(e if isinstance(e, list) else [e])
    by_path = {}
    for e in flat:
        by_path[e["path"]] = e  # parents() may repeat a directory
    return {"tree": sorted(by_path.values(), key=lambda e: e["path"])}


CLIMBS = "its name climbs out of the root"
LINK_CLIMBS = "its hardlink target climbs out of the root"
LINK_MISSING = "hardlink to"


def cases(arena):
    A = arena.rstrip("/")
    a = A.lstrip("/")  # where ARENA lands when an absolute name or symlink is kept in the root
    escape, legal = [], []

    def esc(name, about, layers, expect):
        escape.append((name, about, layers, expect))

    def ok(name, about, layers, expect):
        legal.append((name, about, layers, expect))

    # -- Names that climb out with `..`: refused, nothing written (the target never appears).
    esc("dotdot-file", "a file named ../sentinel",
        [Layer().file("../sentinel", PWNED)], refused(0, "../sentinel", CLIMBS))
    esc("dotdot-new-file", "a new file in the directory beside the root",
        [Layer().file("../outside/new", PWNED)], refused(0, "../outside/new", CLIMBS))
    esc("dotdot-hidden", "`..` hidden inside a name: a/../../outside/sentinel",
        [Layer().dir("a").file("a/../../outside/sentinel", PWNED)],
        refused(0, "a/../../outside/sentinel", CLIMBS))
    esc("dotdot-hidden-deep", "a/b/c/../../../../sentinel",
        [Layer().dir("a").dir("a/b").dir("a/b/c").file("a/b/c/../../../../sentinel", PWNED)],
        refused(0, "a/b/c/../../../../sentinel", CLIMBS))
    esc("dotdot-bare", "a directory entry named ..",
        [Layer().dir("..", 0o700)], refused(0, "../", CLIMBS))
    esc("dotdot-dir", "a directory (mode 0700) created beside the root",
        [Layer().dir("../outside/newdir", 0o700)], refused(0, "../outside/newdir/", CLIMBS))
    esc("dotdot-dir-chmod", "a directory entry for an existing outside directory, mode 0700",
        [Layer().dir("../outside/sub", 0o700)], refused(0, "../outside/sub/", CLIMBS))
    esc("dotdot-symlink-name", "a symlink planted beside the root",
        [Layer().symlink("../outside/link", "/etc")], refused(0, "../outside/link", CLIMBS))
    esc("absolute-dotdot", "/../sentinel: absolute, then climbing",
        [Layer().file("/../sentinel", PWNED)], refused(0, "/../sentinel", CLIMBS))
    esc("dotdot-after-legal-entries", "legal entries, then ../sentinel: no half-applied root",
        [Layer().dir("etc").file("etc/ok", "ok").file("../sentinel", PWNED)],
        refused(0, "../sentinel", CLIMBS))
    esc("dotdot-in-later-layer", "a legal layer, then ../outside/sentinel in the next",
        [Layer().file("ok", "ok"), Layer().file("../outside/sentinel", PWNED)],
        refused(1, "../outside/sentinel", CLIMBS))
    esc("dotdot-fifo", "a fifo beside the root",
        [Layer().fifo("../outside/pipe")], refused(0, "../outside/pipe", CLIMBS))
    esc("dotdot-blockdev", "a block device beside the root",
        [Layer().blockdev("../outside/disk", 8, 0)], refused(0, "../outside/disk", CLIMBS))

    # -- Hardlinks to what is outside: refused.
    esc("hardlink-dotdot", "a hardlink to ../outside/sentinel",
        [Layer().file("a", "a").hardlink("h", "../outside/sentinel")],
        refused(0, "h", LINK_CLIMBS))
    esc("hardlink-hidden-dotdot", "a hardlink to a/../../sentinel",
        [Layer().dir("a").hardlink("h", "a/../../sentinel")], refused(0, "h", LINK_CLIMBS))
    esc("hardlink-absolute-host-path", "a hardlink to ARENA/outside/sentinel by its host path",
        [Layer().hardlink("h", f"{A}/outside/sentinel")], refused(0, "h", LINK_MISSING))
    esc("hardlink-through-symlink-out", "a hardlink to evil/sentinel, evil -> ../outside",
        [Layer().symlink("evil", "../outside"), Layer().hardlink("h", "evil/sentinel")],
        refused(1, "h", LINK_MISSING))
    esc("hardlink-through-absolute-symlink-out",
        "a hardlink to evil/sentinel, evil -> ARENA/outside",
        [Layer().symlink("evil", f"{A}/outside"), Layer().hardlink("h", "evil/sentinel")],
        refused(1, "h", LINK_MISSING))

    # -- Whiteouts and opaque markers that climb out: refused.
    esc("whiteout-dotdot", "../.wh.sentinel",
        [Layer().file("../.wh.sentinel")], refused(0, "../.wh.sentinel", CLIMBS))
    esc("whiteout-dotdot-hidden", "a/../../outside/.wh.sentinel",
        [Layer().dir("a").file("a/../../outside/.wh.sentinel")],
        refused(0, "a/../../outside/.wh.sentinel", CLIMBS))
    esc("whiteout-dotdot-dir", "../.wh.outside: a whole outside directory",
        [Layer().file("../.wh.outside")], refused(0, "../.wh.outside", CLIMBS))
    esc("opaque-dotdot", "../outside/.wh..wh..opq",
        [Layer().file("../outside/.wh..wh..opq")],
        refused(0, "../outside/.wh..wh..opq", CLIMBS))

    # -- Absolute names: kept inside the root (root-relative, as umoci and containerd do).
    esc("absolute-name-host-path", "files named by ARENA's host path land under the root",
        [Layer().file(f"{A}/outside/sentinel", PWNED).file(f"{A}/sentinel", PWNED)],
        tree(parents(f"{a}/outside/x"), F(f"{a}/outside/sentinel", PWNED),
             F(f"{a}/sentinel", PWNED)))

    # -- Symlinks pointing out, written through. Symlinks resolve inside the root, so a
    # write through one lands there when its target exists in the image. When it does not
    # (a dangling symlink), the unpacker refuses the entry rather than make directories
    # through the symlink ("parent evil: ..."); umoci makes them inside the root instead.
    # Either is safe; the corpus pins the refusal.
    esc("symlink-absolute-out-same-layer", "evil -> ARENA/outside (dangling), then evil/sentinel",
        [Layer().symlink("evil", f"{A}/outside").file("evil/sentinel", PWNED)],
        refused(0, "evil/sentinel", "parent evil"))
    esc("symlink-absolute-out-later-layer", "evil -> ARENA/outside; next layer: evil/sentinel",
        [Layer().symlink("evil", f"{A}/outside"), Layer().file("evil/sentinel", PWNED)],
        refused(1, "evil/sentinel", "parent evil"))
    esc("symlink-relative-out-same-layer", "evil -> ../outside (dangling), then evil/sentinel",
        [Layer().symlink("evil", "../outside").file("evil/sentinel", PWNED)],
        refused(0, "evil/sentinel", "parent evil"))
    esc("symlink-relative-out-later-layer", "evil -> ../outside; next layer: evil/sentinel",
        [Layer().symlink("evil", "../outside"), Layer().file("evil/sentinel", PWNED)],
        refused(1, "evil/sentinel", "parent evil"))
    esc("symlink-chain-out", "a -> b -> c/d -> ../../outside (dangling); next: a/sentinel",
        [Layer().dir("c").symlink("c/d", "../../outside").symlink("b", "c/d").symlink("a", "b"),
         Layer().file("a/sentinel", PWNED)],
        refused(1, "a/sentinel", "parent a"))
    esc("symlink-chain-absolute", "x -> /y, y -> ARENA (dangling); next: x/outside/sentinel",
        [Layer().symlink("x", "/y").symlink("y", A), Layer().file("x/outside/sentinel", PWNED)],
        refused(1, "x/outside/sentinel", "parent x/outside"))
    esc("dir-mode-through-symlink-out", "evil -> ../outside (dangling); next: dir evil/sub 0700",
        [Layer().symlink("evil", "../outside"),
         Layer().dir("evil/sub", 0o700).file("evil/sub/f", PWNED)],
        refused(1, "evil/sub/", "parent evil"))
    esc("fifo-through-symlink-out", "evil -> ../outside (dangling), then a fifo evil/pipe",
        [Layer().symlink("evil", "../outside").fifo("evil/pipe")],
        refused(0, "evil/pipe", "parent evil"))
    esc("symlink-absolute-out-contained",
        "ARENA/outside/ in the image, evil -> ARENA/outside; next: evil/sentinel, evil/new",
        [Layer().dir(f"{a}/outside").symlink("evil", f"{A}/outside"),
         Layer().file("evil/sentinel", PWNED).file("evil/new", PWNED)],
        tree(L("evil", f"{A}/outside"), parents(f"{a}/outside/x"),
             F(f"{a}/outside/sentinel", PWNED), F(f"{a}/outside/new", PWNED)))
    esc("symlink-relative-out-contained",
        "outside/ in the image, evil -> ../outside, then evil/sentinel",
        [Layer().dir("outside").symlink("evil", "../outside").file("evil/sentinel", PWNED)],
        tree(L("evil", "../outside"), D("outside"), F("outside/sentinel", PWNED)))
    climb = "/".join([".."] * 32)
    esc("symlink-climb-to-host-root", "up -> ../../.. (32 deep), then up/ARENA/outside/sentinel",
        [Layer().symlink("up", climb), Layer().file(f"up/{a}/outside/sentinel", PWNED)],
        tree(L("up", climb), parents(f"{a}/outside/x"), F(f"{a}/outside/sentinel", PWNED)))
    esc("symlink-chain-out-contained",
        "outside/ in the image, a -> b -> c/d -> ../../outside; next: a/sentinel",
        [Layer().dir("outside").dir("c").symlink("c/d", "../../outside").symlink("b", "c/d")
         .symlink("a", "b"),
         Layer().file("a/sentinel", PWNED)],
        tree(L("a", "b"), L("b", "c/d"), D("c"), L("c/d", "../../outside"), D("outside"),
             F("outside/sentinel", PWNED)))
    esc("symlink-chain-absolute-contained",
        "ARENA/ in the image, x -> /y, y -> ARENA; next: x/outside/sentinel",
        [Layer().dir(a).symlink("x", "/y").symlink("y", A),
         Layer().file("x/outside/sentinel", PWNED)],
        tree(L("x", "/y"), L("y", A), parents(f"{a}/outside/x"),
             F(f"{a}/outside/sentinel", PWNED)))
    esc("symlink-then-dotdot-lexical", "r -> /, then r/../sentinel (`..` is lexical)",
        [Layer().symlink("r", "/"), Layer().file("r/../sentinel", PWNED)],
        tree(L("r", "/"), F("sentinel", PWNED)))
    esc("dir-mode-through-symlink-contained",
        "outside/ in the image, evil -> ../outside; next: dir evil/sub 0700 with a file",
        [Layer().dir("outside").symlink("evil", "../outside"),
         Layer().dir("evil/sub", 0o700).file("evil/sub/f", PWNED)],
        tree(L("evil", "../outside"), D("outside"), D("outside/sub", 0o700),
             F("outside/sub/f", PWNED)))
    esc("file-over-symlink-to-outside-file", "evil -> ../sentinel; next layer: a file evil",
        [Layer().symlink("evil", "../sentinel"), Layer().file("evil", PWNED)],
        tree(F("evil", PWNED)))
    esc("file-over-absolute-symlink-to-outside-file",
        "evil -> ARENA/sentinel; next layer: a file evil",
        [Layer().symlink("evil", f"{A}/sentinel"), Layer().file("evil", PWNED)],
        tree(F("evil", PWNED)))
    esc("file-over-symlink-same-layer", "evil -> ../outside/sentinel, then a file evil",
        [Layer().symlink("evil", "../outside/sentinel").file("evil", PWNED, 0o600)],
        tree(F("evil", PWNED, 0o600)))
    esc("dir-over-symlink-out", "evil -> ../outside; next layer: dir evil 0700 with a file",
        [Layer().symlink("evil", "../outside"),
         Layer().dir("evil", 0o700).file("evil/f", PWNED)],
        tree(D("evil", 0o700), F("evil/f", PWNED)))
    esc("dir-over-absolute-symlink-out-same-layer", "evil -> ARENA/outside, then dir evil 0700",
        [Layer().symlink("evil", f"{A}/outside").dir("evil", 0o700).file("evil/sentinel", PWNED)],
        tree(D("evil", 0o700), F("evil/sentinel", PWNED)))
    esc("hardlink-to-symlink-out", "evil -> ../outside/sentinel, h a hardlink to evil",
        [Layer().symlink("evil", "../outside/sentinel").hardlink("h", "evil")],
        tree(L("evil", "../outside/sentinel", 2), L("h", "../outside/sentinel", 2, "evil")))
    esc("hardlink-to-absolute-symlink-out",
        "evil -> ARENA/outside/sentinel; next layer: h a hardlink to evil",
        [Layer().symlink("evil", f"{A}/outside/sentinel"), Layer().hardlink("h", "evil")],
        tree(L("evil", f"{A}/outside/sentinel", 2),
             L("h", f"{A}/outside/sentinel", 2, "evil")))
    esc("hardlink-through-symlink-contained",
        "outside/sentinel in the image, evil -> ../outside; next layer: h -> evil/sentinel",
        [Layer().dir("outside").file("outside/sentinel", "inside").symlink("evil", "../outside"),
         Layer().hardlink("h", "evil/sentinel")],
        tree(L("evil", "../outside"), D("outside"), F("outside/sentinel", "inside", nlink=2),
             F("h", "inside", nlink=2, same_as="outside/sentinel")))
    esc("whiteout-through-symlink-out", "evil -> ../outside; next layer: evil/.wh.sentinel",
        [Layer().symlink("evil", "../outside"), Layer().file("evil/.wh.sentinel")],
        tree(L("evil", "../outside")))
    esc("whiteout-through-absolute-symlink-out",
        "evil -> ARENA/outside; next layer: evil/.wh.sentinel",
        [Layer().symlink("evil", f"{A}/outside"), Layer().file("evil/.wh.sentinel")],
        tree(L("evil", f"{A}/outside")))
    esc("whiteout-of-symlink-to-outside-dir", "evil -> ../outside; next layer: .wh.evil",
        [Layer().symlink("evil", "../outside"), Layer().file(".wh.evil")], tree())
    esc("whiteout-of-absolute-symlink-to-outside-dir",
        "evil -> ARENA/outside; next layer: .wh.evil",
        [Layer().symlink("evil", f"{A}/outside"), Layer().file(".wh.evil")], tree())
    esc("whiteout-through-symlink-contained",
        "outside/{sentinel,keep} in the image, evil -> ../outside; next: evil/.wh.sentinel",
        [Layer().dir("outside").file("outside/sentinel", "inside").file("outside/keep", "keep")
         .symlink("evil", "../outside"),
         Layer().file("evil/.wh.sentinel")],
        tree(L("evil", "../outside"), D("outside"), F("outside/keep", "keep")))
    esc("opaque-through-symlink-out", "evil -> ../outside; next layer: evil/.wh..wh..opq",
        [Layer().symlink("evil", "../outside"), Layer().file("evil/.wh..wh..opq")],
        tree(L("evil", "../outside")))
    esc("opaque-through-absolute-symlink-out",
        "evil -> ARENA/outside; next layer: evil/.wh..wh..opq",
        [Layer().symlink("evil", f"{A}/outside"), Layer().file("evil/.wh..wh..opq")],
        tree(L("evil", f"{A}/outside")))
    esc("opaque-under-symlinked-parent", "evil -> ../outside; next: evil/sub/.wh..wh..opq",
        [Layer().symlink("evil", "../outside"), Layer().file("evil/sub/.wh..wh..opq")],
        tree(L("evil", "../outside")))
    esc("fifo-through-symlink-contained", "outside/ in the image, evil -> /outside, fifo evil/pipe",
        [Layer().dir("outside").symlink("evil", "/outside").fifo("evil/pipe")],
        tree(L("evil", "/outside"), D("outside"), P("outside/pipe")))
    esc("chardev-over-symlink-to-outside-file", "evil -> ../sentinel; next: char device evil",
        [Layer().symlink("evil", "../sentinel"), Layer().chardev("evil", 1, 3)],
        tree(F("evil", "", 0o666)))

    # -- Legal cases that real images use.
    ok("absolute-and-dot-names", "/etc/..., ./var/..., //double and /./ names, all root-relative",
       [Layer().dir("/etc").file("/etc/hostname", "box").dir("./var").file("./var/log", "log")
        .file("/etc//double", "double").file("etc/./dot", "dot")],
       tree(D("etc"), F("etc/hostname", "box"), F("etc/double", "double"), F("etc/dot", "dot"),
            D("var"), F("var/log", "log")))
    ok("dotdot-that-stays-inside", "a/../b and a/./../c stay in the root",
       [Layer().dir("a").file("a/../b", "b").file("a/./../c", "c")],
       tree(D("a"), F("b", "b"), F("c", "c")))
    ok("usrmerge-symlinks", "bin -> usr/bin, lib -> /usr/lib, sbin -> /usr/bin, then writes",
       [Layer().dir("usr").dir("usr/bin").dir("usr/lib").symlink("bin", "usr/bin")
        .symlink("lib", "/usr/lib").symlink("sbin", "/usr/bin").file("bin/sh", "sh", 0o755),
        Layer().file("lib/libc.so.6", "libc").file("sbin/init", "init", 0o755)
        .dir("lib/firmware", 0o700).file("lib/firmware/blob", "fw")],
       tree(L("bin", "usr/bin"), L("lib", "/usr/lib"), L("sbin", "/usr/bin"), D("usr"),
            D("usr/bin"), F("usr/bin/sh", "sh", 0o755), F("usr/bin/init", "init", 0o755),
            D("usr/lib"), F("usr/lib/libc.so.6", "libc"), D("usr/lib/firmware", 0o700),
            F("usr/lib/firmware/blob", "fw")))
    ok("whiteout-of-missing", "whiteouts of what never existed are no-ops",
       [Layer().dir("etc").file("etc/keep", "keep"),
        Layer().file(".wh.never-existed").file("etc/.wh.missing").file("nodir/.wh.x")],
       tree(D("etc"), F("etc/keep", "keep")))
    ok("whiteouts-remove", "a file, a directory with a read-only child, a symlink",
       [Layer().dir("etc").file("etc/motd", "motd").dir("var").dir("var/cache")
        .dir("var/cache/ro", 0o555).file("var/cache/ro/a", "a").symlink("link", "etc/motd"),
        Layer().file("etc/.wh.motd").file("var/.wh.cache").file(".wh.link")],
       tree(D("etc"), D("var")))
    ok("file-replaced-by-dir", "x a file, then a directory x with a child",
       [Layer().file("x", "file"), Layer().dir("x", 0o750).file("x/y", "y")],
       tree(D("x", 0o750), F("x/y", "y")))
    ok("dir-replaced-by-file", "d a directory tree, then a file d",
       [Layer().dir("d").file("d/a", "a").dir("d/sub").file("d/sub/b", "b"),
        Layer().file("d", "now a file", 0o600)],
       tree(F("d", "now a file", 0o600)))
    ok("dir-replaced-by-symlink", "d a directory, then d -> elsewhere",
       [Layer().dir("d").file("d/a", "a"), Layer().symlink("d", "elsewhere")],
       tree(L("d", "elsewhere")))
    ok("symlink-replaced-by-file", "s -> t (a directory), then a file s",
       [Layer().dir("t").file("t/x", "x").symlink("s", "t"), Layer().file("s", "f")],
       tree(D("t"), F("t/x", "x"), F("s", "f")))
    ok("opaque-dir", "o/ opaque in the upper layer, marker first",
       [Layer().dir("o").file("o/old", "old").dir("o/sub").file("o/sub/deep", "deep")
        .dir("keep").file("keep/x", "x"),
        Layer().dir("o").file("o/.wh..wh..opq").file("o/new", "new")],
       tree(D("o"), F("o/new", "new"), D("keep"), F("keep/x", "x")))
    ok("opaque-marker-after-entries", "the marker after the entries it must keep",
       [Layer().dir("o").file("o/old", "old").dir("o/sub").file("o/sub/deep", "deep"),
        Layer().dir("o").file("o/new", "new").dir("o/sub").file("o/sub/new2", "new2")
        .file("o/.wh..wh..opq")],
       tree(D("o"), F("o/new", "new"), D("o/sub"), F("o/sub/new2", "new2")))
    ok("opaque-root", "an opaque marker at the top hides every lower entry, not the root",
       [Layer().file("a", "a").dir("d").file("d/x", "x"),
        Layer().file(".wh..wh..opq").file("b", "b")],
       tree(F("b", "b")))
    ok("hardlinks-within-root", "relative, absolute and ./ hardlink targets, across layers",
       [Layer().dir("bin").file("bin/busybox", "bb", 0o755).hardlink("bin/sh", "bin/busybox")
        .hardlink("bin/ls", "/bin/busybox").hardlink("bin/cat", "./bin/busybox"),
        Layer().dir("sbin").hardlink("sbin/init", "bin/busybox")],
       tree(D("bin"), F("bin/busybox", "bb", 0o755, 5), F("bin/cat", "bb", 0o755, 5, "bin/busybox"),
            F("bin/ls", "bb", 0o755, 5, "bin/busybox"), F("bin/sh", "bb", 0o755, 5, "bin/busybox"),
            D("sbin"), F("sbin/init", "bb", 0o755, 5, "bin/busybox")))
    ok("hardlink-replaces-file", "b a file, then b a hardlink to a",
       [Layer().file("a", "a").file("b", "old b"), Layer().hardlink("b", "a")],
       tree(F("a", "a", nlink=2), F("b", "a", nlink=2, same_as="a")))
    ok("read-only-dirs", "0555 and 0500 directories filled, also by a later layer",
       [Layer().dir("ro", 0o555).file("ro/f", "f", 0o444).dir("ro/sub", 0o500)
        .file("ro/sub/g", "g", 0o400),
        Layer().file("ro/sub/h", "h")],
       tree(D("ro", 0o555), F("ro/f", "f", 0o444), D("ro/sub", 0o500),
            F("ro/sub/g", "g", 0o400), F("ro/sub/h", "h")))
    ok("fifos-and-devices", "a fifo; device nodes become empty placeholder files",
       [Layer().dir("dev").chardev("dev/null", 1, 3).blockdev("dev/sda", 8, 0)
        .fifo("run/initctl", 0o600)],
       tree(D("dev"), F("dev/null", "", 0o666), F("dev/sda", "", 0o660), D("run"),
            P("run/initctl", 0o600)))
    levels = [f"level-{i:02d}" for i in range(60)]
    deep = "/".join(levels)
    long_name = "n" * 200
    top, bottom = Layer(), Layer()
    for i in range(len(levels)):
        top.dir("/".join(levels[: i + 1]))
    top.file(f"{deep}/bottom", "bottom").file(long_name, "long").symlink("far", deep)
    bottom.file(f"{deep}/{long_name}", "deeper").file("far/through-the-link", "far")
    ok("deep-tree", "60 nested directories, a 200-character name, long link targets",
       [top, bottom],
       tree([D("/".join(levels[: i + 1])) for i in range(len(levels))],
            F(f"{deep}/bottom", "bottom"), F(f"{deep}/{long_name}", "deeper"),
            F(f"{deep}/through-the-link", "far"), F(long_name, "long"), L("far", deep)))

    for cls, group in (("escape", escape), ("legal", legal)):
        for name, about, layers, expect in group:
            yield name, cls, about, layers, expect


SENTINELS = [
    {"path": "sentinel", "type": "file", "mode": "0666", "content": "untouched"},
    {"path": "outside", "type": "dir", "mode": "0777"},
    {"path": "outside/sentinel", "type": "file", "mode": "0666", "content": "untouched"},
    {"path": "outside/sub", "type": "dir", "mode": "0777"},
    {"path": "outside/sub/deep", "type": "file", "mode": "0666", "content": "untouched"},
]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arena", default="/lathe-hostile-arena",
                   help="absolute path of the directory that will hold the root and sentinels")
    p.add_argument("outdir")
    args = p.parse_args()
    if not os.path.isabs(args.arena):
        sys.exit("--arena must be an absolute path")
    os.makedirs(args.outdir, exist_ok=True)
    listing, seen = [], set()
    for name, cls, about, layers, expect in cases(args.arena):
        assert name not in seen, name
        seen.add(name)
        os.makedirs(os.path.join(args.outdir, name), exist_ok=True)
        files = []
        for i, layer in enumerate(layers):
            rel = f"{name}/layer{i}.tar"
            with open(os.path.join(args.outdir, rel), "wb") as f:
                f.write(layer.tar())
            files.append(rel)
        listing.append({"name": name, "class": cls, "about": about, "layers": files,
                        "expect": expect})
    doc = {"arena": args.arena, "root": "root", "sentinels": SENTINELS, "cases": listing}
    with open(os.path.join(args.outdir, "cases.json"), "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
