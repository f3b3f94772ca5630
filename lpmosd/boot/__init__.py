"""The regional as its IDC's boot server: iPXE scripts, per-boot credentials, artifacts.

Core logic only (no HTTP): :mod:`.scripts` renders iPXE scripts, :mod:`.decision` decides
how a MAC boots from the regional's view, :mod:`.cpio` writes the credential initrd,
:mod:`.artifacts` resolves and describes served files, :mod:`.ostypes` publishes the OS
types a regional can install, :mod:`.dnsmasq` renders the proxy-DHCP/TFTP drop-in, and
:mod:`.service` ties them to the regional's state.
"""
