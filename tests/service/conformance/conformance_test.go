// containerd's snapshotter conformance suite (snapshots/testsuite) run against
// `mergefs serve` through containerd's proxy snapshotter client, the same path
// containerd takes for a [proxy_plugins] snapshotter. Each test starts its own
// service on a private store and socket and stops it (SIGTERM, by pid).
//
// Built offline in GOPATH mode against Debian's golang-github-containerd-containerd-dev:
//   GO111MODULE=off GOPATH=/usr/share/gocode go test -c -o /tmp/conf .
// Environment: MERGEFS_SERVE = the command that starts the service (split on
// spaces), e.g. "/repo/.venv/bin/mergefs serve". tests/service/test_conformance.py runs it.
package conformance

import (
	"context"
	"fmt"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"github.com/containerd/continuity/fs/fstest"
	"google.golang.org/grpc"
)

// startService runs `mergefs serve --root ROOT/store --socket ROOT/mergefs.sock` and
// returns a proxy snapshotter on its socket and a function that stops it.
func startService(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	argv := strings.Fields(os.Getenv("MERGEFS_SERVE"))
	if len(argv) == 0 {
		return nil, nil, fmt.Errorf("MERGEFS_SERVE is not set")
	}
	sock := filepath.Join(root, "mergefs.sock")
	argv = append(argv, "--root", filepath.Join(root, "store"), "--socket", sock)
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	stop := func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-done:
			return err
		case <-time.After(30 * time.Second):
			// the service bounds each step of stopping (about 11 s at most, even
			// with four stopping at once); one that hangs fails the test; its views mount
			// is detached so that the failure leaks no mount
			_ = cmd.Process.Kill()
			<-done
			_ = syscall.Unmount(filepath.Join(root, "views"), syscall.MNT_DETACH)
			return fmt.Errorf("mergefs serve did not stop within 30 s of SIGTERM")
		}
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-done:
			return nil, nil, fmt.Errorf("mergefs serve exited before listening: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			stop()
			return nil, nil, fmt.Errorf("mergefs serve did not listen on %s within 60 s", sock)
		}
		time.Sleep(20 * time.Millisecond)
	}
	conn, err := grpc.Dial("unix://"+sock, grpc.WithInsecure())
	if err != nil {
		stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "mergefs")
	return sn, func() error { conn.Close(); return stop() }, nil
}

func TestMergefsSnapshotter(t *testing.T) {
	testsuite.SnapshotterSuite(t, "mergefs", startService)
}

// TestRename is the suite's Rename check, which the suite skips because kernel
// overlayfs fails it on some kernels: renames of a lower directory and of lower
// files, and a rename over a lower file, then commit; each committed snapshot seen
// through a view must equal the same changes applied to a plain directory.
func TestRename(t *testing.T) {
	ctx := namespaces.WithNamespace(context.Background(), "testsuite")
	tmp := t.TempDir()
	root, work, flat := filepath.Join(tmp, "root"), filepath.Join(tmp, "work"), filepath.Join(tmp, "flat")
	for _, d := range []string{root, work, flat} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	sn, stop, err := startService(ctx, root)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := stop(); err != nil {
			t.Errorf("stopping the service: %v", err)
		}
	}()
	layers := []fstest.Applier{
		fstest.Apply(
			fstest.CreateDir("/dir1", 0o700),
			fstest.CreateDir("/somefiles", 0o700),
			fstest.CreateFile("/somefiles/f1", []byte("was here first!"), 0o644),
			fstest.CreateFile("/somefiles/f2", []byte("nothing interesting"), 0o644)),
		fstest.Apply(
			fstest.Rename("/dir1", "/dir2"),
			fstest.CreateFile("/somefiles/f1-overwrite", []byte("new content 1"), 0o644),
			fstest.Rename("/somefiles/f1-overwrite", "/somefiles/f1"),
			fstest.Rename("/somefiles/f2", "/somefiles/f3")),
	}
	parent := ""
	for i, layer := range layers {
		name := fmt.Sprintf("rename-%d-%d", i, rand.Int())
		if err := withMounted(ctx, sn, name+"-prepare", parent, work, false, layer.Apply); err != nil {
			t.Fatalf("layer %d: %v", i+1, err)
		}
		if err := sn.Commit(ctx, name, name+"-prepare"); err != nil {
			t.Fatalf("commit of layer %d: %v", i+1, err)
		}
		if err := layer.Apply(flat); err != nil {
			t.Fatal(err)
		}
		check := func(dir string) error { return fstest.CheckDirectoryEqual(flat, dir) }
		if err := withMounted(ctx, sn, name+"-view", name, work, true, check); err != nil {
			t.Fatalf("layer %d seen through a view: %v", i+1, err)
		}
		parent = name
	}
}

// withMounted prepares (or views) KEY over PARENT, mounts it, runs fn on it and unmounts.
func withMounted(ctx context.Context, sn snapshots.Snapshotter, key, parent, work string,
	view bool, fn func(string) error) (err error) {
	var ms []mount.Mount
	if view {
		ms, err = sn.View(ctx, key, parent)
		defer func() {
			if e := sn.Remove(ctx, key); e != nil && err == nil {
				err = e
			}
		}()
	} else {
		ms, err = sn.Prepare(ctx, key, parent)
	}
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp(work, "mnt")
	if err != nil {
		return err
	}
	defer os.Remove(dir)
	if err := mount.All(ms, dir); err != nil {
		return err
	}
	defer func() {
		if e := mount.UnmountAll(dir, 0); e != nil && err == nil {
			err = e
		}
	}()
	return fn(dir)
}
