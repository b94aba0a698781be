package kubernetes

// The manifests are checked the way a cluster would take them, without a
// cluster: every document is decoded strictly into its Kubernetes API type
// (an unknown field, a duplicate key or an unknown kind fails), the
// references between objects resolve, every Torus container's command line
// uses only flags its binary has, and the controller, started with its
// container's own arguments on a real (embedded) etcd, answers for the
// CSIDriver, the StorageClass and the VolumeSnapshotClass: its name, its
// capabilities, and CreateVolume, CreateSnapshot and a clone with their
// parameters.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/torus-storage/torus/internal/testcluster"
)

func TestMain(m *testing.M) {
	os.Exit(testcluster.Main(m, testcluster.MainOptions{}))
}

// namespace is the namespace of every namespaced object.
const namespace = "torus"

// torusImages are the images make image builds, with the binaries each
// holds in its PATH; the first is its entrypoint.
var torusImages = map[string][]string{
	"torus-storage/torusd":    {"torusd", "torusctl", "torusblk"},
	"torus-storage/torus-csi": {"torus-csi", "torusblk", "torusctl"},
}

// secrets are the Secrets the manifests mount and the operator creates
// (docs/KUBERNETES.md says how).
var secrets = []string{"torus-ca", "torus-csi-tls"}

// reservedParams are the StorageClass parameters that the external
// provisioner takes for itself (it passes no csi.storage.k8s.io/ key to
// CreateVolume) and these manifests may use. Every other parameter goes to
// the driver's CreateVolume, which TestDriver calls with it.
var reservedParams = map[string]bool{"csi.storage.k8s.io/fstype": true}

// volumeSnapshotClass is snapshot.storage.k8s.io/v1 VolumeSnapshotClass
// (kubernetes-csi/external-snapshotter's client/apis/volumesnapshot/v1),
// whose type is not in k8s.io/api.
type volumeSnapshotClass struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Driver            string            `json:"driver"`
	Parameters        map[string]string `json:"parameters,omitempty"`
	DeletionPolicy    string            `json:"deletionPolicy"`
}

// kinds are the kinds the manifests may hold, by apiVersion and kind, with
// whether they are cluster scoped.
var kinds = map[string]struct {
	new     func() metav1.Object
	cluster bool
}{
	"v1/Namespace":        {func() metav1.Object { return new(corev1.Namespace) }, true},
	"v1/ConfigMap":        {func() metav1.Object { return new(corev1.ConfigMap) }, false},
	"v1/Service":          {func() metav1.Object { return new(corev1.Service) }, false},
	"v1/ServiceAccount":   {func() metav1.Object { return new(corev1.ServiceAccount) }, false},
	"apps/v1/StatefulSet": {func() metav1.Object { return new(appsv1.StatefulSet) }, false},
	"apps/v1/DaemonSet":   {func() metav1.Object { return new(appsv1.DaemonSet) }, false},
	"apps/v1/Deployment":  {func() metav1.Object { return new(appsv1.Deployment) }, false},
	"rbac.authorization.k8s.io/v1/ClusterRole":        {func() metav1.Object { return new(rbacv1.ClusterRole) }, true},
	"rbac.authorization.k8s.io/v1/ClusterRoleBinding": {func() metav1.Object { return new(rbacv1.ClusterRoleBinding) }, true},
	"rbac.authorization.k8s.io/v1/Role":               {func() metav1.Object { return new(rbacv1.Role) }, false},
	"rbac.authorization.k8s.io/v1/RoleBinding":        {func() metav1.Object { return new(rbacv1.RoleBinding) }, false},
	"storage.k8s.io/v1/CSIDriver":                     {func() metav1.Object { return new(storagev1.CSIDriver) }, true},
	"storage.k8s.io/v1/StorageClass":                  {func() metav1.Object { return new(storagev1.StorageClass) }, true},
	"snapshot.storage.k8s.io/v1/VolumeSnapshotClass":  {func() metav1.Object { return new(volumeSnapshotClass) }, true},
}

// object is one decoded manifest document.
type object struct {
	where string // FILE#N, N counting the file's documents from 1
	key   string // apiVersion/kind, a key of kinds
	kind  string
	obj   metav1.Object
}

// manifests are the decoded documents of every manifest file, in file
// order.
type manifests struct {
	files []string
	objs  []object
}

// strict decodes JSON j into v, refusing unknown fields and trailing data.
func strict(j []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(j))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return err
	}
	if d.More() {
		return errors.New("data after the object")
	}
	return nil
}

// decodeFile decodes every document of a manifest file strictly into the
// type its apiVersion and kind name.
func decodeFile(file string) ([]object, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r := utilyaml.NewYAMLReader(bufio.NewReader(f))
	var objs []object
	for n := 1; ; n++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%s#%d: %w", file, n, err)
		}
		where := fmt.Sprintf("%s#%d", file, n)
		j, err := yaml.YAMLToJSONStrict(doc)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", where, err)
		}
		if t := bytes.TrimSpace(j); len(t) == 0 || string(t) == "null" {
			continue // comments only
		}
		var tm metav1.TypeMeta
		if err := json.Unmarshal(j, &tm); err != nil {
			return nil, fmt.Errorf("%s: %w", where, err)
		}
		k, ok := kinds[tm.APIVersion+"/"+tm.Kind]
		if !ok {
			return nil, fmt.Errorf("%s: unknown kind %q of apiVersion %q (a new kind goes into kinds, with its API type)", where, tm.Kind, tm.APIVersion)
		}
		obj := k.new()
		if err := strict(j, obj); err != nil {
			return nil, fmt.Errorf("%s: %s %s: %w", where, tm.APIVersion, tm.Kind, err)
		}
		objs = append(objs, object{where: where, key: tm.APIVersion + "/" + tm.Kind, kind: tm.Kind, obj: obj})
	}
	return objs, nil
}

// load decodes every manifest of this directory.
func load(t *testing.T) *manifests {
	t.Helper()
	all, err := filepath.Glob("*.y*ml")
	if err != nil {
		t.Fatal(err)
	}
	m := &manifests{}
	for _, f := range all {
		if f == "kustomization.yaml" {
			continue
		}
		if !strings.HasSuffix(f, ".yaml") {
			t.Errorf("%s: name manifests *.yaml", f)
			continue
		}
		objs, err := decodeFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if len(objs) == 0 {
			t.Errorf("%s: no object", f)
		}
		m.files = append(m.files, f)
		m.objs = append(m.objs, objs...)
	}
	if len(m.objs) == 0 {
		t.Fatal("no manifest found")
	}
	return m
}

// all returns the objects of one kind, with where each is.
func all[T metav1.Object](m *manifests) []T {
	var out []T
	for _, o := range m.objs {
		if v, ok := o.obj.(T); ok {
			out = append(out, v)
		}
	}
	return out
}

// find returns the object of kind and name, if any.
func (m *manifests) find(kind, name string) (metav1.Object, bool) {
	for _, o := range m.objs {
		if o.kind == kind && o.obj.GetName() == name {
			return o.obj, true
		}
	}
	return nil, false
}

// pod is a pod template of a workload.
type pod struct {
	owner  string // Kind/name
	spec   *corev1.PodSpec
	claims []string // volumeClaimTemplates of a StatefulSet
}

// pods returns the pod templates of every workload, checking that each
// workload's selector selects its own template.
func (m *manifests) pods(t *testing.T) []pod {
	var out []pod
	check := func(owner string, sel *metav1.LabelSelector, tpl *corev1.PodTemplateSpec) {
		s, err := metav1.LabelSelectorAsSelector(sel)
		if err != nil || s.Empty() || !s.Matches(labels.Set(tpl.Labels)) {
			t.Errorf("%s: its selector %v does not select its pod template's labels %v (%v)", owner, sel, tpl.Labels, err)
		}
	}
	for _, o := range m.objs {
		owner := o.kind + "/" + o.obj.GetName()
		switch w := o.obj.(type) {
		case *appsv1.Deployment:
			check(owner, w.Spec.Selector, &w.Spec.Template)
			out = append(out, pod{owner: owner, spec: &w.Spec.Template.Spec})
		case *appsv1.DaemonSet:
			check(owner, w.Spec.Selector, &w.Spec.Template)
			out = append(out, pod{owner: owner, spec: &w.Spec.Template.Spec})
		case *appsv1.StatefulSet:
			check(owner, w.Spec.Selector, &w.Spec.Template)
			p := pod{owner: owner, spec: &w.Spec.Template.Spec}
			for _, c := range w.Spec.VolumeClaimTemplates {
				p.claims = append(p.claims, c.Name)
			}
			out = append(out, p)
			if svc, ok := m.find("Service", w.Spec.ServiceName); !ok || svc.(*corev1.Service).Spec.ClusterIP != corev1.ClusterIPNone {
				t.Errorf("%s: serviceName %q is not a headless Service of the manifests", owner, w.Spec.ServiceName)
			}
		}
	}
	return out
}

// containers returns a pod's init and regular containers.
func (p pod) containers() []*corev1.Container {
	var cs []*corev1.Container
	for i := range p.spec.InitContainers {
		cs = append(cs, &p.spec.InitContainers[i])
	}
	for i := range p.spec.Containers {
		cs = append(cs, &p.spec.Containers[i])
	}
	return cs
}

// mountOf returns the volume mounted at dir in container c (the mount whose
// path is dir or its longest parent) and the mount.
func (p pod) mountOf(c *corev1.Container, dir string) (*corev1.Volume, *corev1.VolumeMount) {
	var best *corev1.VolumeMount
	for i, vm := range c.VolumeMounts {
		if (dir == vm.MountPath || strings.HasPrefix(dir, strings.TrimSuffix(vm.MountPath, "/")+"/")) &&
			(best == nil || len(vm.MountPath) > len(best.MountPath)) {
			best = &c.VolumeMounts[i]
		}
	}
	if best == nil {
		return nil, nil
	}
	for i := range p.spec.Volumes {
		if p.spec.Volumes[i].Name == best.Name {
			return &p.spec.Volumes[i], best
		}
	}
	return nil, best
}

// envRef matches a $(VAR) reference in a command or its arguments.
var envRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// TestManifests decodes every manifest strictly and checks the references
// between them: namespaces, service accounts, roles, config maps, secrets,
// volumes and the variables of command lines.
func TestManifests(t *testing.T) {
	m := load(t)
	if _, ok := m.find("Namespace", namespace); !ok {
		t.Errorf("no Namespace %s", namespace)
	}
	seen := map[string]string{}
	for _, o := range m.objs {
		meta := o.obj
		id := o.kind + "/" + meta.GetNamespace() + "/" + meta.GetName()
		if prev, dup := seen[id]; dup {
			t.Errorf("%s: %s is defined in %s too", o.where, id, prev)
		}
		seen[id] = o.where
		if meta.GetName() == "" {
			t.Errorf("%s: %s without a name", o.where, o.kind)
		}
		cluster := kinds[o.key].cluster
		switch {
		case cluster && meta.GetNamespace() != "":
			t.Errorf("%s: %s %s is cluster scoped but names namespace %q", o.where, o.kind, meta.GetName(), meta.GetNamespace())
		case !cluster && meta.GetNamespace() != namespace:
			t.Errorf("%s: %s %s: namespace %q, want %q", o.where, o.kind, meta.GetName(), meta.GetNamespace(), namespace)
		}
	}

	for _, b := range all[*rbacv1.ClusterRoleBinding](m) {
		checkBinding(t, m, "ClusterRoleBinding/"+b.Name, b.RoleRef, b.Subjects)
	}
	for _, b := range all[*rbacv1.RoleBinding](m) {
		checkBinding(t, m, "RoleBinding/"+b.Name, b.RoleRef, b.Subjects)
	}

	docs, err := os.ReadFile("../../docs/KUBERNETES.md")
	if err != nil {
		t.Fatalf("the deployment's documentation: %v", err)
	}
	for _, p := range m.pods(t) {
		checkPod(t, m, p, string(docs))
	}
}

// checkBinding checks that a binding's role and subjects are in the
// manifests.
func checkBinding(t *testing.T, m *manifests, owner string, ref rbacv1.RoleRef, subjects []rbacv1.Subject) {
	if _, ok := m.find(ref.Kind, ref.Name); !ok {
		t.Errorf("%s: roleRef %s %s is not in the manifests", owner, ref.Kind, ref.Name)
	}
	for _, s := range subjects {
		if s.Kind != "ServiceAccount" {
			t.Errorf("%s: subject %s %s: only ServiceAccounts of the manifests are bound", owner, s.Kind, s.Name)
			continue
		}
		if sa, ok := m.find("ServiceAccount", s.Name); !ok || sa.GetNamespace() != s.Namespace {
			t.Errorf("%s: subject ServiceAccount %s/%s is not in the manifests", owner, s.Namespace, s.Name)
		}
	}
}

// checkPod checks a pod template's references: its service account, its
// volumes and their uses, config maps, secrets, images and the variables
// of its command lines.
func checkPod(t *testing.T, m *manifests, p pod, docs string) {
	if sa := p.spec.ServiceAccountName; sa != "" {
		if _, ok := m.find("ServiceAccount", sa); !ok {
			t.Errorf("%s: serviceAccountName %s is not in the manifests", p.owner, sa)
		}
	}
	declared := map[string]bool{}
	for _, v := range p.spec.Volumes {
		if declared[v.Name] {
			t.Errorf("%s: volume %s declared twice", p.owner, v.Name)
		}
		declared[v.Name] = true
		if s := v.Secret; s != nil {
			if !slices.Contains(secrets, s.SecretName) {
				t.Errorf("%s: volume %s: Secret %s is not one of the documented secrets %v", p.owner, v.Name, s.SecretName, secrets)
			}
			if !strings.Contains(docs, "create secret generic "+s.SecretName) {
				t.Errorf("%s: Secret %s: docs/KUBERNETES.md does not say how to create it (kubectl create secret generic %s)", p.owner, s.SecretName, s.SecretName)
			}
		}
		if cm := v.ConfigMap; cm != nil {
			if _, ok := m.find("ConfigMap", cm.Name); !ok {
				t.Errorf("%s: volume %s: ConfigMap %s is not in the manifests", p.owner, v.Name, cm.Name)
			}
		}
	}
	for _, c := range p.claims {
		declared[c] = true
	}
	used := map[string]bool{}
	for _, c := range p.containers() {
		where := p.owner + " container " + c.Name
		for _, vm := range c.VolumeMounts {
			if !declared[vm.Name] {
				t.Errorf("%s: mounts volume %s, which the pod does not declare", where, vm.Name)
			}
			used[vm.Name] = true
		}
		env := map[string]bool{}
		for _, e := range c.Env {
			env[e.Name] = true
			if r := e.ValueFrom; r != nil && r.ConfigMapKeyRef != nil {
				cm, ok := m.find("ConfigMap", r.ConfigMapKeyRef.Name)
				if !ok {
					t.Errorf("%s: env %s: ConfigMap %s is not in the manifests", where, e.Name, r.ConfigMapKeyRef.Name)
				} else if _, ok := cm.(*corev1.ConfigMap).Data[r.ConfigMapKeyRef.Key]; !ok {
					t.Errorf("%s: env %s: ConfigMap %s has no key %s", where, e.Name, r.ConfigMapKeyRef.Name, r.ConfigMapKeyRef.Key)
				}
			}
		}
		if len(c.EnvFrom) > 0 {
			t.Errorf("%s: envFrom: name each variable in env instead, so that this test sees it", where)
		}
		for _, a := range slices.Concat(c.Command, c.Args) {
			for _, ref := range envRef.FindAllStringSubmatch(a, -1) {
				if !env[ref[1]] {
					t.Errorf("%s: %q refers to $(%s), which the container does not define (the kubelet would pass it as it is)", where, a, ref[1])
				}
			}
		}
		checkImage(t, where, c.Image)
	}
	for name := range declared {
		if !used[name] {
			t.Errorf("%s: volume %s is declared but mounted nowhere", p.owner, name)
		}
	}
}

// checkImage checks that an image names a tag: a Torus image one of the
// two make image builds (its tag is checked with kustomization.yaml), any
// other a pinned version.
func checkImage(t *testing.T, where, image string) {
	name, tag := image, ""
	if i := strings.LastIndex(image, ":"); i > strings.LastIndex(image, "/") {
		name, tag = image[:i], image[i+1:]
	}
	if tag == "" || strings.Contains(image, "@") {
		t.Errorf("%s: image %q: name a tag", where, image)
		return
	}
	if strings.HasPrefix(name, "torus-storage/") || strings.Contains(name, "/torus") {
		if _, ok := torusImages[name]; !ok {
			t.Errorf("%s: image %q: the Torus images are %v", where, image, slices.Sorted(maps.Keys(torusImages)))
		}
		return
	}
	if tag == "latest" {
		t.Errorf("%s: image %q: pin a version", where, image)
	}
}

// splitImage splits an image reference into its name and tag.
func splitImage(image string) (name, tag string) {
	if i := strings.LastIndex(image, ":"); i > strings.LastIndex(image, "/") {
		return image[:i], image[i+1:]
	}
	return image, ""
}

// kustomization is the part of kustomize's Kustomization that
// kustomization.yaml may use.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Resources  []string `json:"resources"`
	Images     []struct {
		Name    string `json:"name"`
		NewName string `json:"newName,omitempty"`
		NewTag  string `json:"newTag,omitempty"`
	} `json:"images"`
}

// TestKustomization checks that kustomization.yaml lists every manifest in
// the order of their names, and that its images are the Torus images with
// the tag the manifests name.
func TestKustomization(t *testing.T) {
	m := load(t)
	b, err := os.ReadFile("kustomization.yaml")
	if err != nil {
		t.Fatal(err)
	}
	j, err := yaml.YAMLToJSONStrict(b)
	if err != nil {
		t.Fatal(err)
	}
	var k kustomization
	if err := strict(j, &k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
		t.Errorf("kustomization.yaml: %s %s, want kustomize.config.k8s.io/v1beta1 Kustomization", k.APIVersion, k.Kind)
	}
	if !slices.Equal(k.Resources, m.files) {
		t.Errorf("kustomization.yaml lists resources %v, want every manifest in name order: %v", k.Resources, m.files)
	}
	tags := map[string]string{}
	for _, img := range k.Images {
		if _, ok := torusImages[img.Name]; !ok {
			t.Errorf("kustomization.yaml: image %s is not a Torus image", img.Name)
		}
		if img.NewName != "" || img.NewTag == "" {
			t.Errorf("kustomization.yaml: image %s: as shipped, only newTag (the tag the manifests name)", img.Name)
		}
		tags[img.Name] = img.NewTag
	}
	if !slices.Equal(slices.Sorted(maps.Keys(tags)), slices.Sorted(maps.Keys(torusImages))) {
		t.Errorf("kustomization.yaml: images %v, want %v", slices.Sorted(maps.Keys(tags)), slices.Sorted(maps.Keys(torusImages)))
	}
	n := 0
	for _, p := range m.pods(t) {
		for _, c := range p.containers() {
			name, tag := splitImage(c.Image)
			if _, ok := torusImages[name]; ok {
				n++
				if tag != tags[name] {
					t.Errorf("%s container %s: image %s, but kustomization.yaml tags %s %q", p.owner, c.Name, c.Image, name, tags[name])
				}
			}
		}
	}
	if n == 0 {
		t.Error("no container runs a Torus image")
	}
}

// arg is a flag of a command line: --name=value, or --name alone.
type arg struct {
	value    string
	hasValue bool
}

// parseArgs splits a container's command line into its leading subcommand
// words and its flags, each written --name=value (or --name for a boolean):
// a separate value would be ambiguous to check.
func parseArgs(args []string) (sub []string, flags map[string]arg, err error) {
	flags = map[string]arg{}
	for i, a := range args {
		if !strings.HasPrefix(a, "-") {
			if len(flags) > 0 {
				return nil, nil, fmt.Errorf("argument %q after flags: write every flag as --name=value", a)
			}
			sub = append(sub, a)
			continue
		}
		if !strings.HasPrefix(a, "--") || a == "--" {
			return nil, nil, fmt.Errorf("argument %d %q: write flags as --name=value", i, a)
		}
		name, value, has := strings.Cut(a[2:], "=")
		if _, dup := flags[name]; dup {
			return nil, nil, fmt.Errorf("flag --%s given twice", name)
		}
		flags[name] = arg{value, has}
	}
	return sub, flags, nil
}

// flagLine matches a flag in a usage message (pflag's layout): its name
// and, for a flag that takes a value, the value's name.
var flagLine = regexp.MustCompile(`^\s+(?:-[A-Za-z], )?--([a-z0-9][a-z0-9-]*)(?: ([^\s]+))?(?:\s{2,}|$)`)

// helpFlags runs `bin SUB... --help` and returns the flags it lists, each
// with whether it takes a value.
func helpFlags(t *testing.T, bin string, sub []string) map[string]bool {
	t.Helper()
	cmd := exec.Command(bin, append(slices.Clone(sub), "--help")...)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s --help: %v", filepath.Base(bin), strings.Join(sub, " "), err)
	}
	flags := map[string]bool{}
	for l := range strings.SplitSeq(string(out), "\n") {
		if mm := flagLine.FindStringSubmatch(l); mm != nil {
			flags[mm[1]] = mm[2] != ""
		}
	}
	if len(flags) == 0 {
		t.Fatalf("%s %s --help lists no flag:\n%s", filepath.Base(bin), strings.Join(sub, " "), out)
	}
	return flags
}

// torusContainer is a container that runs a Torus image.
type torusContainer struct {
	pod   pod
	c     *corev1.Container
	where string
	bin   string // the binary it runs
	sub   []string
	flags map[string]arg
}

// torusContainers returns the containers that run a Torus image, checking
// that the binary they run is in the image.
func torusContainers(t *testing.T, m *manifests) []torusContainer {
	var out []torusContainer
	for _, p := range m.pods(t) {
		for _, c := range p.containers() {
			name, _ := splitImage(c.Image)
			bins, ok := torusImages[name]
			if !ok {
				continue
			}
			tc := torusContainer{pod: p, c: c, where: p.owner + " container " + c.Name, bin: bins[0]}
			args := c.Args
			if len(c.Command) > 0 {
				tc.bin = path.Base(c.Command[0])
				args = slices.Concat(c.Command[1:], c.Args)
			}
			if !slices.Contains(bins, tc.bin) {
				t.Errorf("%s: runs %s, which image %s does not hold (it holds %v)", tc.where, tc.bin, name, bins)
				continue
			}
			var err error
			if tc.sub, tc.flags, err = parseArgs(args); err != nil {
				t.Errorf("%s: %v", tc.where, err)
				continue
			}
			out = append(out, tc)
		}
	}
	return out
}

// otherArgs parses a non-Torus container's arguments the same way.
func otherArgs(t *testing.T, where string, c *corev1.Container) map[string]arg {
	_, flags, err := parseArgs(slices.Concat(c.Command, c.Args))
	if err != nil {
		t.Errorf("%s: %v", where, err)
	}
	return flags
}

// envOf returns the container's definition of the variable that a flag
// value of the form $(NAME) refers to, or nil.
func envOf(c *corev1.Container, value string) *corev1.EnvVar {
	mm := envRef.FindStringSubmatch(value)
	if mm == nil || mm[0] != value {
		return nil
	}
	for i := range c.Env {
		if c.Env[i].Name == mm[1] {
			return &c.Env[i]
		}
	}
	return nil
}

// TestCommandLines builds the Torus binaries and checks every Torus
// container's command line against the usage its binary prints: each flag
// exists, and one that takes a value has it. It then checks what the
// flags point at: the node plugin's host paths, certificates and node
// name, torusd's data, CA and socket, and the sockets the CSI sidecars
// share with the driver.
func TestCommandLines(t *testing.T) {
	m := load(t)
	tcs := torusContainers(t, m)
	if len(tcs) == 0 {
		t.Fatal("no container runs a Torus image")
	}
	helps := map[string]map[string]bool{}
	for _, tc := range tcs {
		bin := testcluster.Bin(t, tc.bin)
		key := tc.bin + " " + strings.Join(tc.sub, " ")
		if helps[key] == nil {
			helps[key] = helpFlags(t, bin, tc.sub)
		}
		for name, a := range tc.flags {
			takes, ok := helps[key][name]
			switch {
			case !ok:
				t.Errorf("%s: %s has no flag --%s (see %s --help)", tc.where, strings.TrimSpace(key), name, strings.TrimSpace(key))
			case takes && !a.hasValue:
				t.Errorf("%s: --%s takes a value: write --%s=VALUE", tc.where, name, name)
			}
		}
	}

	drivers := all[*storagev1.CSIDriver](m)
	if len(drivers) != 1 {
		t.Fatalf("%d CSIDriver objects, want 1", len(drivers))
	}
	driver := drivers[0].Name
	var nodePlugin, torusd *torusContainer
	for i := range tcs {
		tc := &tcs[i]
		switch {
		case tc.bin == "torus-csi":
			checkCSIPod(t, tc, driver)
			if tc.flags["mode"].value == "node" {
				if nodePlugin != nil {
					t.Errorf("%s: a second node plugin (%s is one)", tc.where, nodePlugin.where)
				}
				nodePlugin = tc
				checkNodePlugin(t, tc)
			}
		case tc.bin == "torusd" && len(tc.sub) == 0:
			torusd = tc
		}
	}
	if nodePlugin == nil || torusd == nil {
		t.Fatalf("want a torus-csi --mode=node container and a torusd container (have %v, %v)", nodePlugin != nil, torusd != nil)
	}
	checkTorusd(t, torusd, nodePlugin)
}

// checkCSIPod checks that every CSI sidecar in a torus-csi pod dials the
// driver's socket, through the same volume.
func checkCSIPod(t *testing.T, tc *torusContainer, driver string) {
	sock, ok := strings.CutPrefix(tc.flags["endpoint"].value, "unix://")
	if !ok || !path.IsAbs(sock) {
		t.Errorf("%s: --endpoint=%s: want unix:///PATH", tc.where, tc.flags["endpoint"].value)
		return
	}
	dv, dm := tc.pod.mountOf(tc.c, sock)
	if dv == nil || dm.MountPath != path.Dir(sock) {
		t.Errorf("%s: the directory of its socket %s is not a volume mount", tc.where, sock)
		return
	}
	sidecars := 0
	for _, c := range tc.pod.containers() {
		if c == tc.c {
			continue
		}
		where := tc.pod.owner + " container " + c.Name
		flags := otherArgs(t, where, c)
		a, ok := flags["csi-address"]
		if !ok {
			t.Errorf("%s: no --csi-address: every container beside the driver is one of its sidecars", where)
			continue
		}
		sidecars++
		if a.value != sock {
			t.Errorf("%s: --csi-address=%s, but the driver serves %s", where, a.value, sock)
		}
		if v, vm := tc.pod.mountOf(c, a.value); v != dv || vm.MountPath != dm.MountPath {
			t.Errorf("%s: does not mount the driver's socket volume %s at %s", where, dv.Name, dm.MountPath)
		}
		if reg, ok := flags["kubelet-registration-path"]; ok {
			want := "/var/lib/kubelet/plugins/" + driver + "/" + path.Base(sock)
			if dv.HostPath == nil || reg.value != path.Join(dv.HostPath.Path, path.Base(sock)) || reg.value != want {
				t.Errorf("%s: --kubelet-registration-path=%s: want %s, the host path of the driver's socket", where, reg.value, want)
			}
		}
	}
	if sidecars == 0 {
		t.Errorf("%s: no sidecar in its pod", tc.where)
	}
}

// checkNodePlugin checks what the node plugin needs of its pod.
func checkNodePlugin(t *testing.T, tc *torusContainer) {
	spec := tc.pod.spec
	if !spec.HostNetwork || !spec.HostPID || spec.DNSPolicy != corev1.DNSClusterFirstWithHostNet {
		t.Errorf("%s: want hostNetwork, hostPID and dnsPolicy ClusterFirstWithHostNet", tc.pod.owner)
	}
	if sc := tc.c.SecurityContext; sc == nil || sc.Privileged == nil || !*sc.Privileged {
		t.Errorf("%s: want privileged", tc.where)
	}
	if e := envOf(tc.c, tc.flags["node-id"].value); e == nil || e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("%s: --node-id=%s: want $(VAR), VAR from the field spec.nodeName", tc.where, tc.flags["node-id"].value)
	}
	if v, vm := tc.pod.mountOf(tc.c, tc.flags["tls-dir"].value); v == nil || v.Secret == nil || vm.MountPath != tc.flags["tls-dir"].value {
		t.Errorf("%s: --tls-dir=%s: want a Secret mounted there", tc.where, tc.flags["tls-dir"].value)
	}
	hostDirs := map[string]string{"run-dir": tc.flags["run-dir"].value, "kubelet": "/var/lib/kubelet", "dev": "/dev"}
	for what, dir := range hostDirs {
		v, vm := tc.pod.mountOf(tc.c, dir)
		if v == nil || v.HostPath == nil || vm.MountPath != dir || v.HostPath.Path != dir {
			t.Errorf("%s: %s %s: want the host's %s mounted there", tc.where, what, dir, dir)
		}
	}
	if _, vm := tc.pod.mountOf(tc.c, "/var/lib/kubelet"); vm != nil && (vm.MountPropagation == nil || *vm.MountPropagation != corev1.MountPropagationBidirectional) {
		t.Errorf("%s: /var/lib/kubelet: want mountPropagation Bidirectional (the mounts it makes must reach the pods)", tc.where)
	}
}

// checkTorusd checks torusd's data dir, CA and socket: the socket must be
// where the node plugin's device servers find it.
func checkTorusd(t *testing.T, tc, nodePlugin *torusContainer) {
	if v, _ := tc.pod.mountOf(tc.c, tc.flags["data-dir"].value); v == nil || v.HostPath == nil {
		t.Errorf("%s: --data-dir=%s: want a host path", tc.where, tc.flags["data-dir"].value)
	}
	if v, _ := tc.pod.mountOf(tc.c, tc.flags["cluster-dir"].value); v == nil || v.Secret == nil {
		t.Errorf("%s: --cluster-dir=%s: want a Secret (the CA)", tc.where, tc.flags["cluster-dir"].value)
	}
	if !tc.pod.spec.HostNetwork {
		t.Errorf("%s: want hostNetwork (clients dial the host's address)", tc.pod.owner)
	}
	sock := tc.flags["socket"].value
	v, vm := tc.pod.mountOf(tc.c, sock)
	if v == nil || v.HostPath == nil {
		t.Errorf("%s: --socket=%s: want it in a host path the node plugin mounts too", tc.where, sock)
		return
	}
	pv, pm := nodePlugin.pod.mountOf(nodePlugin.c, sock)
	if pv == nil || pv.HostPath == nil || pv.HostPath.Path != v.HostPath.Path || pm.MountPath != vm.MountPath {
		t.Errorf("%s: does not mount host path %s at %s, where torusd's socket %s is", nodePlugin.where, v.HostPath.Path, vm.MountPath, sock)
	}
}

// startController runs the controller container's command line with its
// variables set for the test (only $(TORUS_ETCD), at etcd) and its
// endpoint moved into a temporary directory, and returns a connection to
// it.
func startController(t *testing.T, tc *torusContainer, etcd string) *grpc.ClientConn {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "csi.sock")
	vars := map[string]string{"TORUS_ETCD": etcd}
	var args []string
	for _, a := range slices.Concat(tc.c.Command, tc.c.Args)[min(len(tc.c.Command), 1):] {
		if strings.HasPrefix(a, "--endpoint=") {
			a = "--endpoint=unix://" + sock
		}
		a = envRef.ReplaceAllStringFunc(a, func(ref string) string {
			v, ok := vars[envRef.FindStringSubmatch(ref)[1]]
			if !ok {
				t.Fatalf("%s: %s: this test sets only %v", tc.where, ref, slices.Sorted(maps.Keys(vars)))
			}
			return v
		})
		args = append(args, a)
	}
	logPath := filepath.Join(dir, "torus-csi.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(testcluster.Bin(t, tc.bin), args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("torus-csi %v on SIGINT: %v", args, err)
			}
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
			t.Errorf("torus-csi %v did not stop within 10 s of SIGINT", args)
		}
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("torus-csi log:\n%s", b)
		}
	})
	for deadline := time.Now().Add(30 * time.Second); ; {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case err := <-exited:
			b, _ := os.ReadFile(logPath)
			t.Fatalf("torus-csi %v exited before it served: %v\n%s", args, err, b)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("torus-csi %v did not serve %s within 30 s", args, sock)
		}
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// TestDriver starts the controller as its container would run it, on an
// embedded etcd holding an initialised cluster, and checks the objects
// Kubernetes reads about the driver against what it answers: the
// CSIDriver's, StorageClass's and VolumeSnapshotClass's driver name; that
// no attach step is required (no ControllerPublish); that a StorageClass's
// parameters make a volume (and an unknown one is refused, so that the
// check can fail), in both volume modes and in the access modes
// docs/KUBERNETES.md names, that it grows if the class allows expansion;
// and that a VolumeSnapshotClass's snapshot restores into a new volume.
func TestDriver(t *testing.T) {
	m := load(t)
	var ctl *torusContainer
	for _, tc := range torusContainers(t, m) {
		if tc.bin == "torus-csi" && tc.flags["mode"].value == "controller" {
			if ctl != nil {
				t.Fatalf("two controllers: %s and %s", ctl.where, tc.where)
			}
			ctl = &tc
		}
	}
	if ctl == nil {
		t.Fatal("no torus-csi --mode=controller container")
	}
	quiet := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	cl := testcluster.NewCluster(t, testcluster.Options{Logger: quiet})
	conn := startController(t, ctl, cl.Endpoint)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	info, err := csi.NewIdentityClient(conn).GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil {
		t.Fatalf("GetPluginInfo: %v", err)
	}
	name := info.GetName()
	for _, d := range all[*storagev1.CSIDriver](m) {
		if d.Name != name {
			t.Errorf("CSIDriver %s: the driver calls itself %s", d.Name, name)
		}
		if d.Spec.AttachRequired == nil || *d.Spec.AttachRequired {
			t.Errorf("CSIDriver %s: attachRequired must be false: the controller has no ControllerPublishVolume", d.Name)
		}
	}
	cc := csi.NewControllerClient(conn)
	cr, err := cc.ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
	if err != nil {
		t.Fatalf("ControllerGetCapabilities: %v", err)
	}
	caps := map[csi.ControllerServiceCapability_RPC_Type]bool{}
	for _, c := range cr.GetCapabilities() {
		caps[c.GetRpc().GetType()] = true
	}
	if caps[csi.ControllerServiceCapability_RPC_PUBLISH_UNPUBLISH_VOLUME] {
		t.Error("the controller publishes volumes: the CSIDriver's attachRequired: false is wrong")
	}

	classes := all[*storagev1.StorageClass](m)
	if len(classes) == 0 {
		t.Fatal("no StorageClass")
	}
	const size = 64 << 20
	mount := func(fs string, mode csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
		return &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: fs}},
			AccessMode: &csi.VolumeCapability_AccessMode{Mode: mode}}
	}
	block := &csi.VolumeCapability{AccessType: &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER}}
	create := func(name string, params map[string]string, vc *csi.VolumeCapability, src *csi.VolumeContentSource) error {
		_, err := cc.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: name, CapacityRange: &csi.CapacityRange{RequiredBytes: size},
			VolumeCapabilities: []*csi.VolumeCapability{vc}, Parameters: params, VolumeContentSource: src})
		return err
	}
	var firstVol string
	var firstParams map[string]string
	for _, sc := range classes {
		if sc.Provisioner != name {
			t.Errorf("StorageClass %s: provisioner %s, but the driver calls itself %s", sc.Name, sc.Provisioner, name)
		}
		params := map[string]string{}
		for k, v := range sc.Parameters {
			if strings.HasPrefix(k, "csi.storage.k8s.io/") {
				if !reservedParams[k] {
					t.Errorf("StorageClass %s: parameter %s: not one these manifests expect (reservedParams)", sc.Name, k)
				}
				continue
			}
			params[k] = v
		}
		// ReadWriteOnce is SINGLE_NODE_WRITER, ReadWriteOncePod
		// SINGLE_NODE_SINGLE_WRITER.
		fs := sc.Parameters["csi.storage.k8s.io/fstype"]
		vol := "k8s-" + sc.Name
		if err := create(vol, params, mount(fs, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER), nil); err != nil {
			t.Errorf("StorageClass %s: CreateVolume with parameters %v and fstype %q: %v", sc.Name, params, fs, err)
			continue
		}
		if err := create(vol+"-block", params, block, nil); err != nil {
			t.Errorf("StorageClass %s: CreateVolume of a block volume (ReadWriteOncePod): %v", sc.Name, err)
		}
		if err := create(vol+"-rox", params, mount(fs, csi.VolumeCapability_AccessMode_MULTI_NODE_READER_ONLY), nil); status.Code(err) != codes.InvalidArgument {
			t.Errorf("StorageClass %s: CreateVolume for ReadOnlyMany: %v, want InvalidArgument (one node at a time)", sc.Name, err)
		}
		bad := maps.Clone(params)
		bad["torus-test-unknown"] = "1"
		if err := create(vol+"-bad", bad, mount(fs, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER), nil); status.Code(err) != codes.InvalidArgument {
			t.Errorf("CreateVolume with an unknown parameter: %v, want InvalidArgument (else this test cannot tell a bad parameter)", err)
		}
		if sc.AllowVolumeExpansion != nil && *sc.AllowVolumeExpansion {
			if !caps[csi.ControllerServiceCapability_RPC_EXPAND_VOLUME] {
				t.Errorf("StorageClass %s allows expansion, but the controller cannot expand", sc.Name)
			}
			r, err := cc.ControllerExpandVolume(ctx, &csi.ControllerExpandVolumeRequest{VolumeId: vol,
				CapacityRange: &csi.CapacityRange{RequiredBytes: 2 * size}, VolumeCapability: mount(fs, csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)})
			if err != nil || r.GetCapacityBytes() < 2*size || !r.GetNodeExpansionRequired() {
				t.Errorf("StorageClass %s: ControllerExpandVolume: %v, %v (want the new size, and the filesystem grown by the node)", sc.Name, r, err)
			}
		}
		if firstVol == "" {
			firstVol, firstParams = vol, params
		}
	}
	if firstVol == "" {
		t.Fatal("no volume to snapshot")
	}
	for _, vsc := range all[*volumeSnapshotClass](m) {
		if vsc.Driver != name {
			t.Errorf("VolumeSnapshotClass %s: driver %s, but the driver calls itself %s", vsc.Name, vsc.Driver, name)
		}
		if vsc.DeletionPolicy != "Delete" && vsc.DeletionPolicy != "Retain" {
			t.Errorf("VolumeSnapshotClass %s: deletionPolicy %q: want Delete or Retain", vsc.Name, vsc.DeletionPolicy)
		}
		if !caps[csi.ControllerServiceCapability_RPC_CREATE_DELETE_SNAPSHOT] {
			t.Errorf("VolumeSnapshotClass %s: the controller cannot snapshot", vsc.Name)
		}
		sr, err := cc.CreateSnapshot(ctx, &csi.CreateSnapshotRequest{Name: "k8s-" + vsc.Name, SourceVolumeId: firstVol, Parameters: vsc.Parameters})
		if err != nil {
			t.Errorf("VolumeSnapshotClass %s: CreateSnapshot of %s with parameters %v: %v", vsc.Name, firstVol, vsc.Parameters, err)
			continue
		}
		src := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Snapshot{
			Snapshot: &csi.VolumeContentSource_SnapshotSource{SnapshotId: sr.GetSnapshot().GetSnapshotId()}}}
		if err := create("k8s-restore-"+vsc.Name, firstParams, mount("", csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER), src); err != nil {
			t.Errorf("a claim from VolumeSnapshot of class %s: CreateVolume from snapshot %s: %v", vsc.Name, sr.GetSnapshot().GetSnapshotId(), err)
		}
	}
	// A claim whose dataSource is another claim.
	if !caps[csi.ControllerServiceCapability_RPC_CLONE_VOLUME] {
		t.Error("the controller cannot clone volumes, which docs/KUBERNETES.md describes")
	}
	src := &csi.VolumeContentSource{Type: &csi.VolumeContentSource_Volume{Volume: &csi.VolumeContentSource_VolumeSource{VolumeId: firstVol}}}
	if err := create("k8s-clone", firstParams, mount("", csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER), src); err != nil {
		t.Errorf("a claim cloned from another: CreateVolume from volume %s: %v", firstVol, err)
	}
}
