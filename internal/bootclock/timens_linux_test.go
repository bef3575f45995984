package bootclock

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestTimeNamespace: an anchor saved in one time namespace is read by a
// pcpd in another, in the same boot (the boot id is the host's), whose
// CLOCK_BOOTTIME is offset by 100000 s (unshare --time --boottime: a
// container's or a CRIU restore's namespace). The wall clock did not
// step, so Step must measure none (or refuse the anchor), never the
// offset: on h/bootclk it measured a step back of 27.8 h, and the start
// restored in a frame 27.8 h ahead: every lease dropped as expired, the
// epoch continued 27.8 h higher. Root, util-linux unshare with --time; a
// child test process reads the anchor.
func TestTimeNamespace(t *testing.T) {
	if os.Getenv(childDir) != "" {
		t.Skip("the child's test")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root (unshare --time)")
	}
	if err := exec.Command("unshare", "--fork", "--time", "--boottime", "1", "true").Run(); err != nil {
		t.Skipf("no time namespaces here: %v", err)
	}
	for _, off := range []int{100000, 0} {
		t.Run(strconv.Itoa(off), func(t *testing.T) {
			dir := t.TempDir()
			k := New(dir, System())
			origin := time.Now().Add(-time.Hour).Round(0)
			if err := k.Save(time.Now, origin); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command("unshare", "--fork", "--time", "--boottime", strconv.Itoa(off),
				os.Args[0], "-test.run", "^TestTimeNamespaceChild$", "-test.v")
			cmd.Env = append(os.Environ(), childDir+"="+dir, childOrigin+"="+strconv.FormatInt(origin.UnixNano(), 10))
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("child: %v\n%s", err, out)
			}
			_, res, ok := strings.Cut(string(out), "STEP ")
			if !ok {
				t.Fatalf("child said:\n%s", out)
			}
			res, _, _ = strings.Cut(res, "\n")
			if strings.HasPrefix(res, "error") {
				return // not used: the stored times count as they are
			}
			d, err := time.ParseDuration(res)
			if err != nil {
				t.Fatal(err)
			}
			if d < -time.Second || d > time.Second {
				t.Errorf("step measured in a time namespace with boottime offset %d s: %v (the wall clock did not step)", off, d)
			}
		})
	}
}

const (
	childDir    = "BOOTCLOCK_TEST_DIR"
	childOrigin = "BOOTCLOCK_TEST_ORIGIN"
)

// TestTimeNamespaceChild is TestTimeNamespace's reader, in the namespace.
func TestTimeNamespaceChild(t *testing.T) {
	dir := os.Getenv(childDir)
	if dir == "" {
		t.Skip("TestTimeNamespace runs it")
	}
	ns, err := strconv.ParseInt(os.Getenv(childOrigin), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	d, err := New(dir, System()).Step(time.Unix(0, ns))
	if err != nil {
		fmt.Printf("STEP error %v (other boot %v)\n", err, errors.Is(err, ErrOtherBoot))
		return
	}
	fmt.Printf("STEP %v\n", d)
}

// TestReadTimensOffset: the boottime offset of /proc/self/timens_offsets,
// none without the file, an error for one that cannot be read as such
// (the anchor is then not used).
func TestReadTimensOffset(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, text string
		want       time.Duration
		err        bool
	}{
		{name: "offset", text: "monotonic           5         0\nboottime       100000       500\n", want: 100000*time.Second + 500},
		{name: "negative", text: "monotonic 0 0\nboottime -30 0\n", want: -30 * time.Second},
		{name: "none", text: "monotonic 0 0\nboottime 0 0\n"},
		{name: "no file"},
		{name: "garbage", text: "boottime x 0\n", err: true},
		{name: "no boottime line", text: "monotonic 0 0\n", err: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := dir + "/" + strings.ReplaceAll(tc.name, " ", "_")
			if tc.text != "" {
				if err := os.WriteFile(p, []byte(tc.text), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			got, err := readTimensOffset(p)
			if got != tc.want || (err != nil) != tc.err {
				t.Errorf("readTimensOffset = %v, %v; want %v, error %v", got, err, tc.want, tc.err)
			}
		})
	}
}
