package recording

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// systemPython is Debian's interpreter, which has python3-numpy and
// python3-neo. Never the first python3 on PATH: a pyenv one lacks both.
const systemPython = "/usr/bin/python3"

// runPython runs script with the system interpreter in isolated mode and a
// clean environment, passing args as sys.argv[1:], and decodes the JSON it
// prints into out. A missing numpy or neo fails the test with the package
// to install.
func runPython(t *testing.T, script string, out any, args ...string) {
	t.Helper()
	requirePythonModules(t)
	cmd := exec.Command(systemPython, append([]string{"-I", "-c", script}, args...)...)
	cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C.UTF-8", "HOME=" + t.TempDir()}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s failed: %v\nstderr:\n%s\nstdout:\n%s", systemPython, err, stderr.String(), stdout.String())
	}
	if err := json.Unmarshal(stdout.Bytes(), out); err != nil {
		t.Fatalf("decode the Python script's output: %v\nstdout:\n%s\nstderr:\n%s", err, stdout.String(), stderr.String())
	}
}

var pythonChecked struct {
	done bool
	err  string
}

// requirePythonModules fails the test (it does not skip it) when the system
// Python lacks numpy or neo: the reader tests are the point of the package.
func requirePythonModules(t *testing.T) {
	t.Helper()
	if !pythonChecked.done {
		pythonChecked.done = true
		if _, err := os.Stat(systemPython); err != nil {
			pythonChecked.err = systemPython + " is missing: apt-get install python3 python3-numpy python3-neo"
		} else {
			cmd := exec.Command(systemPython, "-I", "-c", "import numpy, neo.rawio.openephysbinaryrawio")
			cmd.Env = []string{"PATH=/usr/bin:/bin", "LC_ALL=C.UTF-8", "HOME=" + os.TempDir()}
			if out, err := cmd.CombinedOutput(); err != nil {
				pythonChecked.err = "the system Python cannot import numpy and neo (" + strings.TrimSpace(string(out)) +
					"): apt-get install python3-numpy python3-neo"
			}
		}
	}
	if pythonChecked.err != "" {
		t.Fatal(pythonChecked.err)
	}
}
