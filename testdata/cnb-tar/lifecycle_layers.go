// Command lifecycle_layers writes layer tars the way the CNB lifecycle does, using Go's
// archive/tar, so that lathe's CNB-mode layer writer can be checked byte for byte against it
// (layout-tests/cnb_tar.rs). It follows buildpacks/lifecycle layers/dir.go (DirLayer),
// layers/launcher.go (LauncherLayer, ProcessTypesLayer), layers/factory.go (parents),
// archive/write.go (AddDirToArchive, AddFileToArchive) and archive/writer.go
// (NormalizingTarWriter).
//
// Usage:
//
//	lifecycle_layers dir SOURCE UID GID OUT
//	lifecycle_layers launcher LAUNCHER OUT
//	lifecycle_layers process-types OUT TYPE...
package main

import (
	"archive/tar"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

var normalizedModTime = time.Date(1980, time.January, 1, 0, 0, 1, 0, time.UTC)

// normalizingWriter applies what the lifecycle's NormalizingTarWriter applies to every header.
type normalizingWriter struct {
	tw       *tar.Writer
	forceIDs bool
	uid, gid int
}

func (n *normalizingWriter) writeHeader(h *tar.Header) error {
	h.ModTime = normalizedModTime
	if n.forceIDs {
		h.Uid, h.Gid = n.uid, n.gid
	}
	h.Uname, h.Gname = "", ""
	return n.tw.WriteHeader(h)
}

func addFile(n *normalizingWriter, path string, fi os.FileInfo) error {
	if fi.Mode()&os.ModeSocket != 0 {
		return nil
	}
	h, err := tar.FileInfoHeader(fi, "")
	if err != nil {
		return err
	}
	h.Name = path
	if fi.Mode()&os.ModeSymlink != 0 {
		if h.Linkname, err = os.Readlink(path); err != nil {
			return err
		}
	}
	if err := n.writeHeader(h); err != nil {
		return err
	}
	if !fi.Mode().IsRegular() {
		return nil
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(n.tw, f)
	return err
}

func addParents(n *normalizingWriter, file string) error {
	parent := filepath.Dir(file)
	if parent == "/" {
		return nil
	}
	if err := addParents(n, parent); err != nil {
		return err
	}
	fi, err := os.Stat(parent)
	if err != nil {
		return err
	}
	return addFile(n, parent, fi)
}

func dirLayer(tw *tar.Writer, source string, uid, gid int) error {
	source, err := filepath.Abs(source)
	if err != nil {
		return err
	}
	n := &normalizingWriter{tw: tw}
	if err := addParents(n, source); err != nil {
		return err
	}
	n.forceIDs, n.uid, n.gid = true, uid, gid
	return filepath.Walk(filepath.Clean(source), func(path string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return addFile(n, path, fi)
	})
}

func rootOwnedDir(path string) *tar.Header {
	return &tar.Header{Typeflag: tar.TypeDir, Name: path, Mode: 0755}
}

func launcherLayer(tw *tar.Writer, launcher string) error {
	n := &normalizingWriter{tw: tw}
	for _, dir := range []string{"/cnb", "/cnb/lifecycle"} {
		if err := n.writeHeader(rootOwnedDir(dir)); err != nil {
			return err
		}
	}
	fi, err := os.Stat(launcher)
	if err != nil {
		return err
	}
	h, err := tar.FileInfoHeader(fi, "")
	if err != nil {
		return err
	}
	h.Name, h.Uid, h.Gid, h.Mode = "/cnb/lifecycle/launcher", 0, 0, 0755
	if err := n.writeHeader(h); err != nil {
		return err
	}
	f, err := os.Open(launcher)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(tw, f)
	return err
}

func processTypesLayer(tw *tar.Writer, types []string) error {
	n := &normalizingWriter{tw: tw}
	headers := []*tar.Header{rootOwnedDir("/cnb"), rootOwnedDir("/cnb/process")}
	for _, t := range types {
		headers = append(headers, &tar.Header{
			Typeflag: tar.TypeSymlink,
			Name:     filepath.Join("/cnb/process", t),
			Linkname: "/cnb/lifecycle/launcher",
			Mode:     0755,
		})
	}
	for _, h := range headers {
		if err := n.writeHeader(h); err != nil {
			return err
		}
	}
	return nil
}

func run(args []string) error {
	if len(args) < 2 {
		return fmt.Errorf("usage: lifecycle_layers dir|launcher|process-types ...")
	}
	var out string
	var write func(*tar.Writer) error
	switch args[0] {
	case "dir":
		if len(args) != 5 {
			return fmt.Errorf("usage: lifecycle_layers dir SOURCE UID GID OUT")
		}
		uid, err := strconv.Atoi(args[2])
		if err != nil {
			return err
		}
		gid, err := strconv.Atoi(args[3])
		if err != nil {
			return err
		}
		out = args[4]
		write = func(tw *tar.Writer) error { return dirLayer(tw, args[1], uid, gid) }
	case "launcher":
		if len(args) != 3 {
			return fmt.Errorf("usage: lifecycle_layers launcher LAUNCHER OUT")
		}
		out = args[2]
		write = func(tw *tar.Writer) error { return launcherLayer(tw, args[1]) }
	case "process-types":
		out = args[1]
		write = func(tw *tar.Writer) error { return processTypesLayer(tw, args[2:]) }
	default:
		return fmt.Errorf("unknown layer kind %q", args[0])
	}
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	if err := write(tw); err != nil {
		return err
	}
	return tw.Close()
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "lifecycle_layers:", err)
		os.Exit(1)
	}
}
