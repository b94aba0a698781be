module github.com/torus-storage/torus

go 1.26.0

require (
	github.com/quic-go/quic-go v0.65.0
	github.com/spf13/pflag v1.1.0 // indirect
	golang.org/x/crypto v0.54.0 // indirect
	golang.org/x/net v0.56.0 // indirect
	golang.org/x/sys v0.50.0 // indirect
)
