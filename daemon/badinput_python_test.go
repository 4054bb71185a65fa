package daemon

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
)

// badModule is a Python module file ephysd must refuse to run, and what its
// error says.
type badModule struct {
	name string
	make func(path string) // creates the file (or what stands in its place)
	// preflight: refused before anything is loaded (by the configuration
	// check, or the API's check of the path); otherwise the import or
	// PyProcessor(...) raises and the error carries Python's traceback.
	preflight bool
	want      string
}

func badModules(outsideDir string) []badModule {
	write := func(text string) func(string) {
		return func(p string) { os.WriteFile(p, []byte(text), 0o644) }
	}
	garbage := make([]byte, 512)
	for i := range garbage {
		garbage[i] = byte(i*37 + 11) // NUL bytes and invalid UTF-8
	}
	return []badModule{
		{"missing", func(string) {}, true, "no such file"},
		{"a folder in place of the file", func(p string) { os.MkdirAll(p, 0o755) }, true, "is a folder, not a Python file"},
		{"a pipe in place of the file", func(p string) { syscall.Mkfifo(p, 0o644) }, true, "is not a regular file"},
		{"binary garbage", func(p string) { os.WriteFile(p, garbage, 0o644) }, false, "source code string cannot contain null bytes"},
		{"a syntax error", write("class PyProcessor:\n    def process(self, data)\n        pass\n"), false, "SyntaxError"},
		{"raises on import", write("import no_such_module_ephysd\n"), false, "ModuleNotFoundError"},
		{"no PyProcessor class", write("def process(data):\n    pass\n"), false, "defines no class PyProcessor"},
		{"no process method", write("class PyProcessor:\n    def __init__(self, processor, num_channels, sample_rate):\n        pass\n"), false, "has no process(self, data) method"},
		{"outside module_dirs", func(string) {}, true, "outside the folders modules may be loaded from"},
	}
}

// The bad module's path: in the modules folder, except for the one that
// must lie outside it.
func (m badModule) path(modDir, outsideDir string) string {
	if strings.HasPrefix(m.name, "outside") {
		p := filepath.Join(outsideDir, "elsewhere.py")
		os.WriteFile(p, []byte(passThrough), 0o644)
		return p
	}
	return filepath.Join(modDir, "bad_"+strings.ReplaceAll(m.name, " ", "_")+".py")
}

// A bad module through each way a module is chosen, while acquiring: the
// API's module parameter, and a reload of a configuration that names it.
// Each is refused with a reason (the path, what is wrong; Python's
// traceback for a module that does not import), and the stage goes on
// running its previous module: same path, state running, the configuration
// in force unchanged, no block lost.
func TestBadPythonModuleWhileAcquiring(t *testing.T) {
	at := newAPITest(t, "module_dirs = [\"modules\"]\n", "")
	if err := at.svc.SetMode(Acquire); err != nil {
		t.Fatal(err)
	}
	modDir := filepath.Join(at.dir, "modules")
	good := filepath.Join(modDir, "pass.py")
	goodCfg, _ := os.ReadFile(at.cfgPath)
	outsideDir := t.TempDir()
	running := func(t *testing.T, when string) {
		t.Helper()
		st := at.svc.Status()
		if len(st.Stages) != 1 || st.Stages[0].Path != good || st.Stages[0].State != "running" {
			t.Fatalf("%s: the stage must keep running %s: %+v", when, good, st.Stages)
		}
		if m := at.svc.Config().Stages[0].Module; m != good {
			t.Fatalf("%s: the configuration in force names %s, but %s runs", when, m, good)
		}
		if st.Mode != Acquire || st.Pipeline.Overruns != 0 || st.Pipeline.Gaps != 0 {
			t.Fatalf("%s: mode %s, %d overruns, %d gaps", when, st.Mode, st.Pipeline.Overruns, st.Pipeline.Gaps)
		}
	}
	for _, m := range badModules(outsideDir) {
		t.Run(m.name, func(t *testing.T) {
			path := m.path(modDir, outsideDir)
			m.make(path)
			defer os.RemoveAll(path)
			blocks := at.svc.Status().Pipeline.Blocks

			// The API's module parameter (Open Ephys: PUT
			// /api/processors/<id>/parameters/module).
			code, text, _ := raw(t, "PUT", at.base+"/api/processors/101/parameters/module", fmt.Sprintf(`{"value": %q}`, path), nil)
			if code != http.StatusBadRequest || !strings.Contains(text, m.want) || !strings.Contains(text, filepath.Base(path)) {
				t.Fatalf("set module: %d %q, want 400 with %q", code, text, m.want)
			}
			running(t, "after the API refused it")

			// A reload of a configuration that names it.
			bad := strings.Replace(string(goodCfg), fmt.Sprintf("module = %q", good), fmt.Sprintf("module = %q", path), 1)
			os.WriteFile(at.cfgPath, []byte(bad), 0o644)
			code, text, _ = raw(t, "PUT", at.base+"/api/ephysd/reload", "", nil)
			os.WriteFile(at.cfgPath, goodCfg, 0o644)
			if code != http.StatusBadRequest || !strings.Contains(text, m.want) {
				t.Fatalf("reload: %d %q, want 400 with %q", code, text, m.want)
			}
			if m.preflight && !strings.Contains(text, at.cfgPath+":") {
				t.Fatalf("reload: %q does not name the file and line", text)
			}
			if !m.preflight && !strings.Contains(text, "previous module keeps running") {
				t.Fatalf("reload: %q does not say the previous module keeps running", text)
			}
			running(t, "after the reload was refused")
			waitBlocks(t, at.svc, blocks+10)
		})
	}
	// The good module still loads through both ways.
	other := filepath.Join(modDir, "other.py")
	os.WriteFile(other, []byte(passThrough), 0o644)
	if code, text, _ := raw(t, "PUT", at.base+"/api/processors/101/parameters/module", fmt.Sprintf(`{"value": %q}`, other), nil); code != 200 {
		t.Fatalf("a good module: %d %q", code, text)
	}
	if code, text, _ := raw(t, "PUT", at.base+"/api/ephysd/reload", "", nil); code != 200 || at.svc.Status().Stages[0].Path != good {
		t.Fatalf("reload back to the configured module: %d %q %+v", code, text, at.svc.Status().Stages)
	}
}

// waitBlocks waits until the pipeline has read n blocks (a count; the
// deadline is only a hang guard).
func waitBlocks(t testing.TB, svc *Service, n uint64) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(5 * time.Millisecond) {
		st := svc.Status()
		if st.Pipeline != nil && st.Pipeline.Blocks >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the pipeline did not reach %d blocks: %+v", n, st.Pipeline)
		}
	}
}

// A bad module named by the configuration ephysd starts with: one that is
// not there, not a file or outside module_dirs is refused when the file is
// read (the error names the file, line and key); one that does not import
// leaves its stage "not loaded" — passing blocks through unchanged, which
// are recorded — with the last line of Python's traceback in the status,
// until a reload fixes it.
func TestBadPythonModuleAtStart(t *testing.T) {
	dir := t.TempDir()
	modDir := filepath.Join(dir, "modules")
	os.MkdirAll(modDir, 0o755)
	outsideDir := t.TempDir()
	for _, m := range badModules(outsideDir) {
		t.Run(m.name, func(t *testing.T) {
			path := m.path(modDir, outsideDir)
			m.make(path)
			defer os.RemoveAll(path)
			cfgPath := filepath.Join(dir, "ephysd.toml")
			os.WriteFile(cfgPath, []byte(fmt.Sprintf("[source.sim]\nchannels = 2\n[[stage]]\nmodule = %q\n[control]\nhttp = \"\"\nmodule_dirs = [\"modules\"]\n", path)), 0o644)
			cfg, err := LoadConfig(cfgPath)
			if m.preflight {
				if err == nil || !strings.Contains(err.Error(), m.want) || !strings.Contains(err.Error(), cfgPath+":4: stage[1].module") {
					t.Fatalf("%v, want %s:4: stage[1].module … %s", err, cfgPath, m.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			svc, err := NewService(cfg, zap.NewNop())
			if err != nil {
				t.Fatal(err)
			}
			defer svc.Close()
			if err := svc.SetMode(Acquire); err != nil {
				t.Fatal(err)
			}
			waitBlocks(t, svc, 50)
			st := svc.Status()
			if len(st.Stages) != 1 || st.Stages[0].State != "not loaded" || !st.Stages[0].PassThrough || !strings.Contains(st.Stages[0].LastError, m.want) {
				t.Fatalf("stage %+v, want not loaded, passing blocks through, with %q", st.Stages, m.want)
			}
			if st.Pipeline.Overruns != 0 || st.Pipeline.Gaps != 0 {
				t.Fatalf("%+v", st.Pipeline)
			}
		})
	}
}

// syncLog is a writer safe for a process writing and a test reading.
type syncLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *syncLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *syncLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// waitLogged waits until cond holds (a hang guard of a minute).
func waitLogged(t testing.TB, what string, cond func() bool, log *syncLog) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waiting for %s\n%s", what, log.String())
		}
	}
}

// `ephysd run --config` with a bad configuration exits 1 before it opens
// anything, saying where and what; a SIGHUP reload with a bad configuration
// (a typo, a value out of range, a module that does not import) keeps the
// running configuration and logs why; a good one then applies.
func TestBadConfigRunAndSIGHUP(t *testing.T) {
	bin := buildBinary(t)
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "modules"), 0o755)
	good := filepath.Join(dir, "modules", "pass.py")
	os.WriteFile(good, []byte(passThrough), 0o644)
	os.WriteFile(filepath.Join(dir, "modules", "broken.py"), []byte("def (\n"), 0o644)
	sock := filepath.Join(dir, "control.sock")
	cfgPath := filepath.Join(dir, "ephysd.toml")
	config := func(module, extra string) string {
		return fmt.Sprintf("[source.sim]\nchannels = 4\n[[stage]]\nmodule = %q\n[recording]\nparent_directory = \"recs\"\n[control]\nstart_mode = \"acquire\"\nhttp = \"\"\nsocket = %q\n%s", module, sock, extra)
	}

	// At start: exit status 1, the file, line, key and what to do, and no
	// socket left behind.
	for _, c := range []struct{ doc, want string }{
		{config(good, "htp = \"127.0.0.1:1\"\n"), cfgPath + ":11: control.htp: unknown key: [control] takes"},
		{config(good, "[pipeline]\nqueue_ms = -1\n"), cfgPath + ":12: pipeline.queue_ms: -1: must be > 0"},
		{config("modules/nope.py", ""), cfgPath + ":4: stage[1].module: " + filepath.Join(dir, "modules", "nope.py") + ": no such file"},
	} {
		os.WriteFile(cfgPath, []byte(c.doc), 0o644)
		out, err := exec.Command(bin, "run", "--config", cfgPath).CombinedOutput()
		if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), c.want) {
			t.Fatalf("run with a bad configuration: %v\n%s\nwant exit 1 and %q", err, out, c.want)
		}
		if _, err := os.Stat(sock); err == nil {
			t.Fatal("a refused configuration left a socket")
		}
	}

	os.WriteFile(cfgPath, []byte(config(good, "")), 0o644)
	cmd := exec.Command(bin, "run", "--config", cfgPath)
	var log syncLog
	cmd.Stderr, cmd.Stdout = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		<-done
	}()
	cl := unixHTTP(sock)
	status := func() string {
		resp, err := cl.Get("http://ephysd/api/ephysd/status")
		if err != nil {
			return ""
		}
		defer resp.Body.Close()
		var b bytes.Buffer
		b.ReadFrom(resp.Body)
		return b.String()
	}
	waitLogged(t, "ACQUIRE", func() bool { return strings.Contains(status(), `"mode":"ACQUIRE"`) }, &log)
	hup := func(doc, want string) {
		t.Helper()
		os.WriteFile(cfgPath, []byte(doc), 0o644)
		n := strings.Count(log.String(), want)
		cmd.Process.Signal(syscall.SIGHUP)
		waitLogged(t, want, func() bool { return strings.Count(log.String(), want) > n }, &log)
	}
	for _, c := range []struct{ doc, want string }{
		{config(good, "[pipeline]\nblok_ms = 2\n"), "pipeline.blok_ms: unknown key"},
		{config(good, "[source.sim]\nrate = 5\n"), "ephysd.toml:11: source.sim: the table [source.sim] is given twice (first on line 1)"},
		{strings.Replace(config(good, ""), "channels = 4", "channels = 0", 1), "source.sim.channels: sim: channels = 0: must be 1–4096"},
		{config(filepath.Join(dir, "modules", "broken.py"), ""), "previous module keeps running"},
	} {
		hup(c.doc, c.want)
		if !strings.Contains(log.String(), "reload failed") {
			t.Fatalf("the log does not say the reload failed:\n%s", log.String())
		}
		st := status()
		if !strings.Contains(st, `"mode":"ACQUIRE"`) || !strings.Contains(st, `"Path":"`+good+`"`) || !strings.Contains(st, `"State":"running"`) || !strings.Contains(st, `"overruns":0`) {
			t.Fatalf("after a refused reload: %s", st)
		}
	}
	// A good configuration applies: the stage now runs the other module.
	other := filepath.Join(dir, "modules", "other.py")
	os.WriteFile(other, []byte(passThrough), 0o644)
	hup(config(other, ""), "configuration and Python modules reloaded")
	if st := status(); !strings.Contains(st, `"Path":"`+other+`"`) {
		t.Fatalf("after a good reload: %s", st)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if err := <-done; err != nil {
		t.Fatalf("exit: %v\n%s", err, log.String())
	}
	done <- nil
}

// A module the service user cannot read. Root reads every file, so the
// test drops to user nobody in a child: `ephysd run --config` (the real
// binary) as nobody, with a module of mode 000, must exit 1 saying the
// module cannot be read and what to do.
func TestBadPythonModuleUnreadable(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run the child as another user")
	}
	bin := buildBinary(t)
	// A folder every user can enter, holding a copy of the binary, the
	// configuration and the module.
	dir, err := os.MkdirTemp("", "ephysd-nobody")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o755)
	exe := filepath.Join(dir, "ephysd")
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(exe, data, 0o755)
	mod := filepath.Join(dir, "secret.py")
	os.WriteFile(mod, []byte(passThrough), 0o000)
	os.Chmod(mod, 0o000)
	cfgPath := filepath.Join(dir, "ephysd.toml")
	os.WriteFile(cfgPath, []byte(fmt.Sprintf("[[stage]]\nmodule = %q\n[control]\nhttp = \"\"\nsocket = %q\n", mod, filepath.Join(dir, "s.sock"))), 0o644)
	cmd := exec.Command(exe, "run", "--config", cfgPath)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=/nonexistent"}
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	want := cfgPath + ":2: stage[1].module: " + mod + " cannot be read: permission denied — make it readable by the user ephysd runs as"
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), want) {
		t.Fatalf("as nobody: %v\n%s\nwant exit 1 and %q", err, out, want)
	}
	// As root the same file is readable: the check is the process's own
	// permission, not the mode bits.
	if err := checkModuleFile(mod); err != nil {
		t.Fatalf("as root: %v", err)
	}
}
