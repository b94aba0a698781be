package netquic

// Invariants of the cluster PKI kept by this file:
//   - A private key exists only in a file of mode 0600 written with O_EXCL; no
//     function returns key bytes to its caller, and nothing overwrites a key.
//   - Every peer certificate is verified against the cluster CA in both
//     directions (RequireAndVerifyClientCert on the server, RootCAs on the
//     client); TLS 1.3 only, ALPN "torus/1".

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// File names inside a CA or node directory.
const (
	CACertFile   = "ca.crt"
	CAKeyFile    = "ca.key"
	NodeCertFile = "node.crt"
	NodeKeyFile  = "node.key"
)

// ALPN is the application protocol negotiated on every connection.
const ALPN = "torus/1"

const (
	caValidity   = 10 * 365 * 24 * time.Hour
	nodeValidity = 2 * 365 * 24 * time.Hour
)

// NewCA creates a cluster certificate authority in dir: ca.crt (the
// self-signed certificate) and ca.key (its ECDSA P-256 key, mode 0600). It
// refuses to overwrite an existing ca.crt or ca.key.
func NewCA(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("netquic: new CA: %w", err)
	}
	for _, f := range []string{CACertFile, CAKeyFile} {
		if _, err := os.Lstat(filepath.Join(dir, f)); err == nil {
			return fmt.Errorf("netquic: new CA: %s already exists, refusing to overwrite", filepath.Join(dir, f))
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("netquic: new CA: generate key: %w", err)
	}
	serial, err := randSerial()
	if err != nil {
		return fmt.Errorf("netquic: new CA: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "torus cluster CA", Organization: []string{"torus"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("netquic: new CA: create certificate: %w", err)
	}
	if err := writeKey(filepath.Join(dir, CAKeyFile), key); err != nil {
		return fmt.Errorf("netquic: new CA: %w", err)
	}
	if err := writePEM(filepath.Join(dir, CACertFile), "CERTIFICATE", der, 0o644); err != nil {
		return fmt.Errorf("netquic: new CA: %w", err)
	}
	return nil
}

// IssueCert issues a certificate for node name, valid for hosts (DNS names or
// IP addresses) as both server and client, signed by the CA in caDir. It
// writes node.crt, node.key (mode 0600) and a copy of ca.crt into outDir,
// which then is everything LoadTLS needs. It refuses to overwrite node.key.
func IssueCert(caDir, name string, hosts []string, outDir string) error {
	if name == "" {
		return errors.New("netquic: issue cert: empty name")
	}
	caCert, caKey, err := loadCA(caDir)
	if err != nil {
		return fmt.Errorf("netquic: issue cert %q: %w", name, err)
	}
	if err := os.MkdirAll(outDir, 0o700); err != nil {
		return fmt.Errorf("netquic: issue cert %q: %w", name, err)
	}
	for _, f := range []string{NodeCertFile, NodeKeyFile} {
		if _, err := os.Lstat(filepath.Join(outDir, f)); err == nil {
			return fmt.Errorf("netquic: issue cert %q: %s already exists, refusing to overwrite", name, filepath.Join(outDir, f))
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("netquic: issue cert %q: generate key: %w", name, err)
	}
	serial, err := randSerial()
	if err != nil {
		return fmt.Errorf("netquic: issue cert %q: %w", name, err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: name, Organization: []string{"torus"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(nodeValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		DNSNames:     []string{name},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != name {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return fmt.Errorf("netquic: issue cert %q: create certificate: %w", name, err)
	}
	if err := writeKey(filepath.Join(outDir, NodeKeyFile), key); err != nil {
		return fmt.Errorf("netquic: issue cert %q: %w", name, err)
	}
	if err := writePEM(filepath.Join(outDir, NodeCertFile), "CERTIFICATE", der, 0o644); err != nil {
		return fmt.Errorf("netquic: issue cert %q: %w", name, err)
	}
	caPEM, err := os.ReadFile(filepath.Join(caDir, CACertFile))
	if err != nil {
		return fmt.Errorf("netquic: issue cert %q: %w", name, err)
	}
	if filepath.Clean(caDir) != filepath.Clean(outDir) {
		if err := os.WriteFile(filepath.Join(outDir, CACertFile), caPEM, 0o644); err != nil {
			return fmt.Errorf("netquic: issue cert %q: %w", name, err)
		}
	}
	return nil
}

// TLSConfigs is the pair of TLS configurations of one node: Server for
// Listen, Client for Dial. Both present the node certificate and verify the
// peer against the cluster CA.
type TLSConfigs struct {
	Server *tls.Config
	Client *tls.Config
}

// LoadTLS reads node.crt, node.key and ca.crt from dir (as written by
// IssueCert) and returns mutual-TLS configurations: TLS 1.3 only, ALPN
// "torus/1", peer certificates must chain to the CA. The client verifies the
// server's name against the dialed host unless Client.ServerName is set.
func LoadTLS(dir string) (*TLSConfigs, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, NodeCertFile), filepath.Join(dir, NodeKeyFile))
	if err != nil {
		return nil, fmt.Errorf("netquic: load TLS from %s: %w", dir, err)
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, fmt.Errorf("netquic: load TLS from %s: %w", dir, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("netquic: load TLS from %s: no certificate in %s", dir, CACertFile)
	}
	server := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		NextProtos:   []string{ALPN},
	}
	client := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
		NextProtos:   []string{ALPN},
	}
	return &TLSConfigs{Server: server, Client: client}, nil
}

func loadCA(dir string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, nil, fmt.Errorf("read CA: %w", err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, nil, fmt.Errorf("read CA key: %w", err)
	}
	cb, _ := pem.Decode(certPEM)
	if cb == nil || cb.Type != "CERTIFICATE" {
		return nil, nil, fmt.Errorf("%s: no certificate", CACertFile)
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("parse CA: %w", err)
	}
	kb, _ := pem.Decode(keyPEM)
	if kb == nil {
		return nil, nil, fmt.Errorf("%s: no key", CAKeyFile)
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("parse CA key: %w", err)
	}
	return cert, key, nil
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return fmt.Errorf("marshal key: %w", err)
	}
	return writePEM(path, "EC PRIVATE KEY", der, 0o600)
}

// writePEM creates path exclusively with mode perm and writes one PEM block.
func writePEM(path, typ string, der []byte, perm os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	if err := f.Chmod(perm); err != nil { // umask may have narrowed or widened nothing, but be explicit
		f.Close()
		return fmt.Errorf("chmod %s: %w", path, err)
	}
	if err := pem.Encode(f, &pem.Block{Type: typ, Bytes: der}); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", path, err)
	}
	return nil
}

func randSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("serial: %w", err)
	}
	return s, nil
}
