// Package kubernetes holds the Kubernetes manifests of Torus (the numbered
// YAML files in this directory, applied in name order or with
// kubectl apply -k) and nothing else: its test decodes every manifest
// strictly with the Kubernetes API types and checks it against the
// binaries it runs. docs/KUBERNETES.md describes the deployment.
package kubernetes
