#!/usr/bin/env bash
# Builds (once) what the firmware matrix boots, from Debian packages only
# and without root: the firmware (OVMF, U-Boot; SeaBIOS is QEMU's own
# bios-256k.bin), the stick image and the GRUB native-driver lkrn.
# Cached in $XEN_USB_CACHE/firmware-<key>, the key being the package
# versions and this directory's sources. Prints shell assignments:
#   FW_DIR=... STICK=... GRUB_LKRN=... OVMF_CODE=... OVMF_VARS=... UBOOT_ROM=...
# Progress goes to stderr.
set -euo pipefail
shopt -s inherit_errexit
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${XEN_USB_CACHE:-$HOME/.cache/xen-usb-dm}
mkdir -p "$CACHE"
log() { echo "firmware-images: $*" >&2; }
exec 8>"$CACHE/.firmware-lock"
flock 8

# Host (bookworm) packages: the tools and GRUB (its bookworm tools run here).
HOST_PKGS="mtools dosfstools grub-common grub-pc-bin grub-efi-amd64-bin libefivar1 libefiboot1"
# Firmware (Architecture: all) from trixie, through the guest bed's private APT.
TRIXIE_PKGS="ovmf u-boot-qemu"
. "$HERE/../guest/trixie-apt.sh"

host_updated=0
host_update() { [ $host_updated = 1 ] && return 0; log "apt-get update (host)"; apt-get update -q >/dev/null; host_updated=1; }
hver() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}'; }
vers=""
for p in $HOST_PKGS; do
  v=$(hver "$p")
  if [ -z "$v" ] || [ "$v" = "(none)" ]; then host_update; v=$(hver "$p"); fi
  [ -n "$v" ] && [ "$v" != "(none)" ] || { log "no candidate for $p"; exit 1; }
  vers+="$p=$v "
done
for p in $TRIXIE_PKGS; do
  v=$(tapt apt-cache policy "$p" | awk '/Candidate:/ {print $2}')
  [ -n "$v" ] && [ "$v" != "(none)" ] || { log "no trixie candidate for $p"; exit 1; }
  vers+="$p=$v "
done
key=$( (echo "$vers"; cat "$HERE/images.sh" "$HERE/mbr.S") | sha256sum | cut -c1-12)
D=$CACHE/firmware-$key

emit() {
  echo "FW_DIR=$D"
  echo "STICK=$D/stick.img"
  echo "GRUB_LKRN=$D/grub-native-ehci.lkrn"
  echo "GRUB_UHCI_LKRN=$D/grub-native-uhci.lkrn"
  echo "OVMF_CODE=$D/root/usr/share/OVMF/OVMF_CODE_4M.fd"
  echo "OVMF_VARS=$D/root/usr/share/OVMF/OVMF_VARS_4M.fd"
  echo "UBOOT_ROM=$D/root/usr/lib/u-boot/qemu-x86_64/u-boot.rom"
  echo "FW_VERSIONS=\"${vers% }\""
}
if [ -f "$D/.done" ]; then emit; log "ok (cached) $D"; exit 0; fi

log "building $D (${vers% })"
rm -rf "$D.tmp"; mkdir -p "$D.tmp/debs" "$D.tmp/root"
( cd "$D.tmp/debs"
  for pv in $vers; do
    p=${pv%%=*}
    case " $TRIXIE_PKGS " in
      *" $p "*) tapt apt-get download -q "$pv" >/dev/null ;;
      *) apt-get download -q "$pv" >/dev/null 2>&1 || { host_update; apt-get download -q "$pv" >/dev/null; } ;;
    esac
  done
  for d in ./*.deb; do dpkg-deb -x "$d" ../root; done )
rm -rf "$D.tmp/debs"
R=$D.tmp/root
export PATH="$R/usr/bin:$R/bin:$R/sbin:$R/usr/sbin:$PATH"
export LD_LIBRARY_PATH="$R/lib/x86_64-linux-gnu:$R/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MTOOLS_SKIP_CHECK=1
W=$D.tmp/work; mkdir -p "$W"

# The MBR (boot code + partition table).
as --32 -o "$W/mbr.o" "$HERE/mbr.S"
ld -m elf_i386 -Ttext 0x7c00 --oformat binary -o "$W/mbr.bin" "$W/mbr.o"
[ "$(stat -c %s "$W/mbr.bin")" = 512 ] || { log "mbr.bin is not 512 bytes"; exit 1; }

# marker.txt: its text is in nothing else the firmware could print.
printf 'USB-FILE-MARKER-7f3a: this text lives only in a file on the stick\n' > "$W/marker.txt"

# GRUB EFI (removable-media path), reads marker.txt through the firmware's
# block I/O. The marker's text is not in the config.
cat > "$W/grub-efi.cfg" <<'CFG'
echo GRUB-EFI-STARTED
ls
search --no-floppy --file /marker.txt --set=stick
echo "marker.txt found on ($stick)"
cat ($stick)/marker.txt
halt
CFG
grub-mkstandalone -d "$R/usr/lib/grub/x86_64-efi" -O x86_64-efi --locales= --fonts= --themes= \
  --modules="part_msdos part_gpt fat search search_fs_file cat ls echo halt" \
  -o "$W/BOOTX64.EFI" "boot/grub/grub.cfg=$W/grub-efi.cfg"

# The stick: 64 MiB, MBR, marker sectors at LBA 1 and LBA 64, FAT16 at 1 MiB.
S=$D.tmp/stick.img
truncate -s 64M "$S"
dd if="$W/mbr.bin" of="$S" bs=512 count=1 conv=notrunc status=none
printf 'LBA1-MARKER-OK (sector 1 of the stick)\0' | dd of="$S" bs=512 seek=1 conv=notrunc status=none
printf 'LBA64-MARKER-OK (sector 64 of the stick: a 64-sector INT 13h read worked)\0' \
  | dd of="$S" bs=512 seek=64 conv=notrunc status=none
mkfs.fat -C -F 16 -h 2048 -n USBSTICK "$W/part.img" 64512 >/dev/null
mmd -i "$W/part.img" ::/EFI ::/EFI/BOOT
mcopy -i "$W/part.img" "$W/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$W/part.img" "$W/marker.txt" ::/marker.txt
dd if="$W/part.img" of="$S" bs=512 seek=2048 conv=notrunc,sparse status=none
mdir -i "$S@@1M" ::/ >/dev/null

# GRUB i386-pc with its own EHCI or UHCI driver, loaded with -kernel
# (lnxboot.img + core.img). Loading a native HCD stops the BIOS disks:
# (usb0) is ours.
for hc in ehci uhci; do
  cat > "$W/grub-native.cfg" <<CFG
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
echo GRUB-NATIVE-STARTED
insmod $hc
insmod usbms
ls
cat (usb0,msdos1)/marker.txt
halt
CFG
  grub-mkimage -d "$R/usr/lib/grub/i386-pc" -O i386-pc -o "$W/core.img" -p '(memdisk)/boot/grub' \
    -c "$W/grub-native.cfg" biosdisk part_msdos fat ls cat echo serial terminal usb usbms $hc sleep halt normal
  cat "$R/usr/lib/grub/i386-pc/lnxboot.img" "$W/core.img" > "$D.tmp/grub-native-$hc.lkrn"
done

# Keep only what the matrix uses.
rm -rf "$W"
find "$R" -mindepth 1 -maxdepth 1 ! -name usr -exec rm -rf {} +
find "$R/usr" -mindepth 1 -maxdepth 1 ! -name share ! -name lib -exec rm -rf {} +
find "$R/usr/lib/u-boot" -mindepth 1 -maxdepth 1 ! -name qemu-x86_64 -exec rm -rf {} +
rm -rf "$R/usr/lib/grub" "$R/usr/lib/x86_64-linux-gnu" "$R/usr/share/grub" "$R/usr/share/locale" "$R/usr/share/man" "$R/usr/share/doc"
touch "$D.tmp/.done"
rm -rf "$D"; mv "$D.tmp" "$D"
emit
log "ok $D"
