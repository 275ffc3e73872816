// End-to-end check of the devicekey PKCS#11 module from Java, through the JDK's SunPKCS11 provider.
//
//   java DeviceKeyCheck.java sign CONFIG ALIAS DATA_FILE SIG_OUT
//       Signs DATA_FILE with the token key ALIAS (SHA256withECDSA in SunPKCS11), verifies the
//       signature with the certificate's public key in the JDK's own EC provider, checks that a
//       signature with one byte flipped does NOT verify, and writes the DER signature to SIG_OUT
//       (so that a tool outside Java can verify it too). Prints "sign: OK".
//   java DeviceKeyCheck.java tls CONFIG ALIAS SERVER_CERT_PEM HOST PORT
//       TLS client authentication with the token key: connects, sends a GET, prints the response.
//
// CONFIG is a SunPKCS11 configuration file (name, library). A token that needs a login gets the
// PIN from the environment variable DEVICEKEY_E2E_PIN, given to KeyStore.load (SunPKCS11 logs in
// with it); without the variable no PIN is given.
// Exit status: 0 success, 1 a check failed, 2 usage.

import java.io.ByteArrayOutputStream;
import java.io.FileInputStream;
import java.io.InputStream;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.security.KeyStore;
import java.security.PrivateKey;
import java.security.Provider;
import java.security.Security;
import java.security.Signature;
import java.security.SignatureException;
import java.security.cert.CertificateFactory;
import java.security.cert.X509Certificate;
import javax.net.ssl.KeyManagerFactory;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.TrustManagerFactory;

public final class DeviceKeyCheck {
    private DeviceKeyCheck() {}

    private static Provider provider(String config) {
        Provider base = Security.getProvider("SunPKCS11");
        if (base == null) {
            throw new IllegalStateException("the SunPKCS11 provider is not available");
        }
        Provider p = base.configure(config);
        Security.addProvider(p);
        return p;
    }

    private static KeyStore tokenKeyStore(Provider p) throws Exception {
        KeyStore ks = KeyStore.getInstance("PKCS11", p);
        String pin = System.getenv("DEVICEKEY_E2E_PIN");
        ks.load(null, pin == null ? null : pin.toCharArray());
        return ks;
    }

    private static void fail(String message) {
        System.out.println("FAILED: " + message);
        System.exit(1);
    }

    private static boolean verifies(X509Certificate cert, byte[] data, byte[] sig) throws Exception {
        // The JDK's own EC implementation, not the token.
        Signature v = Signature.getInstance("SHA256withECDSA", "SunEC");
        v.initVerify(cert.getPublicKey());
        v.update(data);
        try {
            return v.verify(sig);
        } catch (SignatureException e) {
            return false; // a malformed signature does not verify
        }
    }

    private static void sign(String config, String alias, String dataFile, String sigOut)
            throws Exception {
        Provider p = provider(config);
        KeyStore ks = tokenKeyStore(p);
        if (!ks.isKeyEntry(alias)) {
            fail("no private key entry " + alias + " in the token");
        }
        PrivateKey key = (PrivateKey) ks.getKey(alias, null);
        X509Certificate cert = (X509Certificate) ks.getCertificate(alias);
        if (cert == null) {
            fail("no certificate for " + alias);
        }
        System.out.println("key: " + key.getAlgorithm() + " from " + p.getName());
        System.out.println("certificate: " + cert.getSubjectX500Principal().getName());

        byte[] data = Files.readAllBytes(Paths.get(dataFile));
        Signature s = Signature.getInstance("SHA256withECDSA", p);
        s.initSign(key);
        s.update(data);
        byte[] sig = s.sign();
        System.out.println("signature: " + sig.length + " bytes (DER)");

        if (!verifies(cert, data, sig)) {
            fail("the token's signature does not verify with the certificate's public key");
        }
        System.out.println("verify: OK");

        // Negative control: one flipped byte in the signature value must not verify.
        byte[] bad = sig.clone();
        bad[bad.length - 5] ^= 0x01;
        if (verifies(cert, data, bad)) {
            fail("a corrupted signature verified: the check proves nothing");
        }
        System.out.println("corrupted signature rejected: OK");

        // Negative control: other data must not verify.
        byte[] other = (new String(data, StandardCharsets.ISO_8859_1) + "x")
                .getBytes(StandardCharsets.ISO_8859_1);
        if (verifies(cert, other, sig)) {
            fail("the signature verified over other data");
        }
        System.out.println("other data rejected: OK");

        Files.write(Paths.get(sigOut), sig);
        System.out.println("sign: OK");
    }

    private static void tls(String config, String alias, String serverPem, String host, int port)
            throws Exception {
        Provider p = provider(config);
        KeyStore ks = tokenKeyStore(p);
        if (!ks.isKeyEntry(alias)) {
            fail("no private key entry " + alias + " in the token");
        }
        KeyManagerFactory kmf = KeyManagerFactory.getInstance("SunX509");
        kmf.init(ks, null);

        KeyStore trust = KeyStore.getInstance("PKCS12");
        trust.load(null, null);
        try (InputStream in = new FileInputStream(serverPem)) {
            X509Certificate server =
                    (X509Certificate) CertificateFactory.getInstance("X.509").generateCertificate(in);
            trust.setCertificateEntry("server", server);
        }
        TrustManagerFactory tmf =
                TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(trust);

        SSLContext ctx = SSLContext.getInstance("TLS");
        ctx.init(kmf.getKeyManagers(), tmf.getTrustManagers(), null);
        try (SSLSocket socket = (SSLSocket) ctx.getSocketFactory().createSocket(host, port)) {
            SSLParameters params = socket.getSSLParameters();
            params.setEndpointIdentificationAlgorithm("HTTPS");
            socket.setSSLParameters(params);
            socket.setSoTimeout(30_000);
            socket.startHandshake();
            System.out.println("handshake: " + socket.getSession().getProtocol() + " "
                    + socket.getSession().getCipherSuite());
            OutputStream out = socket.getOutputStream();
            out.write("GET / HTTP/1.0\r\n\r\n".getBytes(StandardCharsets.US_ASCII));
            out.flush();
            ByteArrayOutputStream page = new ByteArrayOutputStream();
            InputStream in = socket.getInputStream();
            byte[] buf = new byte[8192];
            int n;
            while ((n = in.read(buf)) > 0) {
                page.write(buf, 0, n);
            }
            System.out.println(page.toString(StandardCharsets.ISO_8859_1));
        }
        System.out.println("tls: OK");
    }

    public static void main(String[] args) throws Exception {
        if (args.length == 5 && args[0].equals("sign")) {
            sign(args[1], args[2], args[3], args[4]);
        } else if (args.length == 6 && args[0].equals("tls")) {
            tls(args[1], args[2], args[3], args[4], Integer.parseInt(args[5]));
        } else {
            System.err.println("usage: DeviceKeyCheck sign CONFIG ALIAS DATA SIG_OUT"
                    + " | tls CONFIG ALIAS SERVER_CERT_PEM HOST PORT");
            System.exit(2);
        }
    }
}
